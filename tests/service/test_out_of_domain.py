"""Out-of-domain answers over real HTTP (the tiny bundle's `bentoml serve`, two workers): in_domain and
typicality on every answer, abstentions that keep the public shapes, the counter summed over workers."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tiny_bundle) -> np.ndarray:
    with np.load(tiny_bundle / "probe.npz") as probe:
        return probe["input.image"]


def candidates(digits: np.ndarray) -> list[list]:
    """Inputs unlike any digit: white, uniform noise, a checkerboard, an inverted digit."""
    rng = np.random.default_rng(0)
    checker = (np.indices((28, 28)).sum(axis=0) % 2).astype(float)
    return [np.ones((28, 28)).tolist(), rng.uniform(0, 1, (28, 28)).tolist(), checker.tolist(),
            (1.0 - digits[0, 0]).tolist()]


def out_of_domain_total(url: str, api: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf'^protoserve_out_of_domain_total\{{[^}}]*api="{api}"[^}}]*\}} (\S+)$',
                                             text, re.MULTILINE))


@pytest.fixture(scope="module")
def far_image(server, digits) -> list:
    answer = httpx.post(f"{server}/predict", json={"images": candidates(digits)}, timeout=30).json()
    far = [image for image, p in zip(candidates(digits), answer["predictions"], strict=True) if not p["in_domain"]]
    assert far, f"none of the unlike inputs is out of domain: {answer['predictions']}"
    return far[0]


def test_every_prediction_carries_in_domain_and_typicality(server, digits):
    answer = httpx.post(f"{server}/predict", json={"images": [d[0].tolist() for d in digits]}, timeout=30).json()
    for p in answer["predictions"]:
        assert isinstance(p["in_domain"], bool) and 0.0 <= p["typicality"] <= 1.0 and p["abstained"] is False
        assert isinstance(p["label"], int)
    assert np.mean([p["in_domain"] for p in answer["predictions"]]) >= 0.8  # test digits: in domain


def test_predict_judges_each_image_as_explain_does_in_a_batch_or_alone(server, digits, far_image):
    """/predict judges the images of a session run together (in the batcher), /explain one at a time: the same
    in_domain and typicality for every image, in a many-image call and in concurrent one-image calls."""
    from concurrent.futures import ThreadPoolExecutor

    images = [digits[i, 0].tolist() for i in range(len(digits))] + [far_image]
    together = httpx.post(f"{server}/predict", json={"images": images}, timeout=30).json()["predictions"]

    def alone(image):
        one = httpx.post(f"{server}/predict", json={"images": [image]}, timeout=30).json()["predictions"][0]
        explained = httpx.post(f"{server}/explain", json={"image": image, "top_k": 1}, timeout=30).json()
        return one, explained["prediction"]

    with ThreadPoolExecutor(8) as pool:
        for p, (one, explained) in zip(together, pool.map(alone, images), strict=True):
            assert (p["in_domain"], p["typicality"]) == (one["in_domain"], one["typicality"])
            assert (p["in_domain"], p["typicality"]) == (explained["in_domain"], explained["typicality"])
    assert together[-1]["in_domain"] is False


def test_abstention_keeps_the_public_shape_of_predict(server, digits, far_image):
    body = {"images": [digits[0, 0].tolist(), far_image], "abstain": True}
    answer = httpx.post(f"{server}/predict", json=body, timeout=30).json()
    plain = httpx.post(f"{server}/predict", json={"images": body["images"]}, timeout=30).json()
    withheld = answer["predictions"][1]
    assert set(plain["predictions"][1]) <= set(withheld)  # same fields, plus the reason
    assert withheld["label"] is None and withheld["class_name"] is None and withheld["abstained"] is True
    assert withheld["reason"] == "out_of_domain" and "typicality" in withheld["detail"]
    assert withheld["in_domain"] is False and len(withheld["probabilities"]) == 10
    assert withheld["probabilities"] == pytest.approx(plain["predictions"][1]["probabilities"])
    if answer["predictions"][0]["in_domain"]:
        assert answer["predictions"][0]["label"] == plain["predictions"][0]["label"]


def test_abstention_on_explain_still_shows_the_nearest_prototypes(server, far_image):
    answer = httpx.post(f"{server}/explain", json={"image": far_image, "top_k": 3, "abstain": True}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["prediction"]["label"] is None and body["prediction"]["reason"] == "out_of_domain"
    assert len(body["prototypes"]) == 3 and all(row["image"] for row in body["prototypes"])
    assert "reconstruction" in body and body["model"]["version"] == "0.1.0"


def test_out_of_domain_answers_are_counted_over_both_workers(server, far_image):
    before = out_of_domain_total(server, "predict")
    workers = set()
    for _ in range(8):
        r = httpx.post(f"{server}/predict", json={"images": [far_image, far_image]}, timeout=30)
        workers.add(r.headers["x-protoserve-worker"])
    assert out_of_domain_total(server, "predict") - before == 16
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert re.search(r'^protoserve_out_of_domain_expected_ratio\{model="tiny-prototypedl",version="0.1.0"\} 0\.01$',
                     text, re.MULTILINE)


def test_metadata_shows_the_rule(server):
    domain = httpx.get(f"{server}/metadata", timeout=10).json()["domain"]
    assert domain["false_alarm_rate"] == 0.01 and domain["split"] == "validation"
    assert domain["abstain_by_default"] is False and domain["images"] == 250
    outliers = domain["outliers"]  # the rule on held-out non-digit drawings, measured at export
    assert outliers["images"] > 1000 and 0 <= outliers["flagged"] <= 1 and 0.5 <= outliers["auroc"] <= 1
    assert outliers["trained_with_outlier_exposure"] is False


def test_bad_options_are_refused(server, digits):
    r = httpx.post(f"{server}/predict", json={"images": [digits[0, 0].tolist()], "abstain": "maybe"}, timeout=30)
    assert r.status_code == 400 and r.json()["reason"] == "wrong_type"


def test_canonicalize_over_multipart(server, digits):
    import io

    from PIL import Image

    x = np.full((120, 120), 230, np.uint8)
    big = np.asarray(Image.fromarray((digits[3, 0] * 255).astype(np.uint8)).resize((84, 84)), np.uint8)
    x[30:114, 10:94] -= (big * 0.8).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, format="JPEG", quality=80)
    files = [("images", ("photo.jpg", buffer.getvalue(), "image/jpeg"))]
    plain = httpx.post(f"{server}/predict", files=files, timeout=30).json()["predictions"][0]
    made = httpx.post(f"{server}/predict", files=files, data={"canonicalize": "true"}, timeout=30).json()
    assert made["predictions"][0]["typicality"] > plain["typicality"]


def test_score_batch_rows_carry_in_domain_and_typicality(server, digits, far_image):
    before = out_of_domain_total(server, "score_batch")
    images = [digits[0, 0].tolist(), far_image]
    rows = run_task(server, {"images": images})["rows"]
    assert rows[1]["in_domain"] is False and 0.0 <= rows[1]["typicality"] <= 1.0
    assert isinstance(rows[1]["label"], int) and isinstance(rows[0]["in_domain"], bool)
    withheld = run_task(server, {"images": images, "abstain": True})["rows"]
    assert withheld[1]["label"] is None and withheld[1]["class_name"] is None
    assert withheld[1]["prototype_ids"] == rows[1]["prototype_ids"] and set(withheld[1]) == set(rows[1])
    assert out_of_domain_total(server, "score_batch") - before == 2


def run_task(url: str, body: dict) -> dict:
    import time

    task_id = httpx.post(f"{url}/score_batch/submit", json=body, timeout=30).json()["task_id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/score_batch/status", params={"task_id": task_id}, timeout=10).json()["status"] \
            == "in_progress":
        assert time.monotonic() < deadline, "task still in progress after 60 s"
        time.sleep(0.2)
    result = httpx.get(f"{url}/score_batch/get", params={"task_id": task_id}, timeout=30)
    assert result.status_code == 200, result.text
    return result.json()


def test_the_service_setting_abstains_by_default(start_service, tiny_bundle, far_image, tmp_path):
    """PROTOSERVE_ABSTAIN=1: every out-of-domain answer abstains unless the request says "abstain": false."""
    with start_service(tiny_bundle, tmp_path / "home", tmp_path / "serve.log", PROTOSERVE_WORKERS="1",
                       PROTOSERVE_ABSTAIN="1") as url:
        withheld = httpx.post(f"{url}/predict", json={"images": [far_image]}, timeout=30).json()["predictions"][0]
        asked = httpx.post(f"{url}/predict", json={"images": [far_image], "abstain": False}, timeout=30).json()
        assert withheld["abstained"] is True and withheld["label"] is None
        assert asked["predictions"][0]["abstained"] is False and isinstance(asked["predictions"][0]["label"], int)
        assert httpx.get(f"{url}/metadata", timeout=10).json()["domain"]["abstain_by_default"] is True


def test_flat_pictures_are_out_of_domain_on_every_route(server):
    """A black canvas, a white one and a uniform grey sent as a JPEG (its noise within two grey levels): out of
    domain with typicality 0 on /predict, /explain and /score_batch, whatever the model's score says."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(buffer, format="JPEG", quality=80)
    grey = buffer.getvalue()
    files = [("images", ("grey.jpg", grey, "image/jpeg"))]
    arrays = [np.zeros((28, 28)).tolist(), np.ones((28, 28)).tolist()]
    predicted = httpx.post(f"{server}/predict", json={"images": arrays}, timeout=30).json()["predictions"]
    predicted += httpx.post(f"{server}/predict", files=files, timeout=30).json()["predictions"]
    explained = [httpx.post(f"{server}/explain", json={"image": a, "top_k": 1}, timeout=30).json()["prediction"]
                 for a in arrays]
    rows = run_task(server, {"images": arrays})["rows"]
    for answer in predicted + explained + rows:
        assert (answer["in_domain"], answer["typicality"]) == (False, 0.0), answer
