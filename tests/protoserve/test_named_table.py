import pytest

from protoserve.named_table import NamedTable


class Refused(Exception):
    pass


def test_a_name_is_registered_once_and_a_miss_names_the_known_entries():
    table = NamedTable("colour", Refused)
    assert table.register("red", 1) == 1 and table.lookup("red") == 1
    with pytest.raises(Refused, match="colour 'red' is registered twice"):
        table.register("red", 2)
    table.register("blue", 3)
    with pytest.raises(Refused, match=r"unknown colour 'green' \(known: red, blue\)"):
        table.lookup("green")
    assert list(table) == ["red", "blue"] and table["red"] == 1
