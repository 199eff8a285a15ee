"""The framework floor for benchmarks/serve.py: bare BentoML with protoserve's settings and no work.

    bentoml serve benchmarks.floor_service:Floor

Two API workers, the access log off, tracing excluded on /predict, `images: Any` (BentoML parses the
JSON body and nothing checks it), answering a fixed JSON of /predict's shape (one image, ten classes)
as a ready JSONResponse: no middleware, no decoding, no model, no metrics. What protoserve's /predict
costs beyond this service is protoserve's own work.
"""

from typing import Any

import bentoml
from starlette.responses import JSONResponse

ANSWER = {"model": {"name": "prototypedl-mnist", "version": "1.0.0"},
          "predictions": [{"label": 7, "class_name": "7",
                           "probabilities": [0.0001, 0.0002, 0.0011, 0.0013, 0.0001, 0.0002, 0.00001, 0.9962,
                                             0.0003, 0.0005],
                           "in_domain": True, "typicality": 0.618034, "abstained": False}]}


@bentoml.service(name="floor", workers=2, traffic={"timeout": 60}, logging={"access": {"enabled": False}},
                 tracing={"excluded_urls": ["/predict"]})
class Floor:
    """Answers /predict with a fixed prediction."""

    @bentoml.api(route="/predict")
    async def predict(self, images: Any = None) -> dict:
        """The fixed answer, whatever the images."""
        return JSONResponse(ANSWER)
