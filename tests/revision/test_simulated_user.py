"""The simulated user's rules on constructed cases."""

import numpy as np

from revision.simulated_user import box_judgements, clean_reference, decoded_judgements


def test_box_rule_rejects_only_boxes_off_the_object():
    obj = np.zeros((2, 28, 28), dtype=bool)
    obj[:, 8:20, 8:20] = True
    decoy = np.zeros_like(obj)
    decoy[:, 0:4, 0:4] = True
    boxes = np.array([[0, 6, 0, 6],  # on the decoy corner, off the digit -> reject
                      [18, 24, 18, 24],  # one pixel row/col of the digit at 18..19 -> accept
                      [22, 28, 22, 28]])  # empty bottom-right background -> reject, no decoy
    judged = box_judgements(boxes, np.array([0, 1, 1]), obj, decoy)
    assert [j.non_object for j in judged] == [True, False, True]
    assert judged[0].decoy_overlap == 16 / 36 and judged[2].decoy_overlap == 0.0
    assert judged[1].object_overlap == 4 / 36
    v = judged[0].as_verdict(2)
    assert (v.verdict, v.round, v.source) == ("reject", 2, "simulated:box-off-object")


def test_decoded_rule_rejects_a_decoded_square_brighter_than_clean_digits():
    clean = np.zeros((20, 28, 28), dtype=np.float32)
    clean[:, 8:20, 8:20] = 1.0
    clean[:10, 0:4, 24:28] = 0.02  # class 0's clean images have a faint top-right corner
    labels = np.array([0] * 10 + [1] * 10)
    reference = clean_reference(clean, labels, 2, size=4)
    decoded = np.zeros((3, 28, 28), dtype=np.float32)
    decoded[:, 8:20, 8:20] = 0.9
    decoded[0, 24:28, 0:4] = 0.5  # a square in the bottom-left corner
    decoded[1, 0:4, 24:28] = 0.06  # within margin 0.05 of class 0's faint corner
    decoded[2, 0:4, 24:28] = 0.06  # class 1 has no faint corner: 0.06 > 0 + 0.05
    judged = decoded_judgements(decoded, [0, 0, 1], reference, size=4)
    assert [j.non_object for j in judged] == [True, False, True]
    assert abs(judged[0].decoy_overlap - 0.5) < 1e-6
