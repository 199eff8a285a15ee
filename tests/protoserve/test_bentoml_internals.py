"""The BentoML internals behind protoserve/bentoml_internals.py still behave as the adapter assumes."""

from __future__ import annotations

from protoserve.bentoml_internals import acquire_if_idle, check_internals, cork_dispatcher, model_store, release


def test_bentoml_internals_are_as_the_adapter_assumes():
    problems = check_internals()
    assert not problems, ("BentoML changed internals that service/batching.py and bundle/store.py rely on "
                          "(adapt protoserve/bentoml_internals.py): " + "; ".join(problems))


def test_idle_dispatcher_is_taken_once_and_given_back():
    dispatcher = cork_dispatcher(max_latency_ms=100, max_batch_size=8, fallback=lambda: None)
    assert acquire_if_idle(dispatcher)
    assert not acquire_if_idle(dispatcher)  # a batch is running: the next call must queue
    release(dispatcher)
    assert acquire_if_idle(dispatcher)
    release(dispatcher)


def test_model_store_opens_on_the_given_directory(tmp_path):
    store = model_store(tmp_path)
    assert list(store.list()) == []
