"""The service's OpenAPI document: BentoML's, with the request and answer shapes it cannot know.

The image APIs take `Any` so that the service, not BentoML's pydantic layer, checks each body:
that keeps /predict's per-request cost down (no second walk over 784 floats per image) and gives
every refusal the one error shape `{"error", "reason", "model"}`. BentoML therefore documents
those bodies as untyped; `api_document` replaces them with the exact shapes the checks enforce
(read from the served bundle's manifest: image size, value range, active prototypes), adds the
multipart variants and every error answer, and lists GET beside POST on the read-only catalogue
routes. RequestGate (service/middleware.py) serves the result at /docs.json.

What a schema cannot say: that a string is a decodable PNG or JPEG of a sane size. A body that
matches the schema may still be refused with a 400 whose reason is one of IMAGE_CONTENT_REASONS.
"""

from __future__ import annotations

import copy

from bundle.manifest import Manifest
from protoserve.errors import REASONS

# The 400 reasons a schema-valid body can still get: the image bytes themselves are bad.
IMAGE_CONTENT_REASONS = ("not_an_image", "corrupt_image", "image_too_large", "bad_base64")
OVERLOADED = "overloaded"  # the 503 of /predict's adaptive batcher
ERROR_STATUSES = {400: "Bad input: the body or one of its images is refused (reason names the problem)",
                  413: "Body over the size limit, or a batch task with too many images",
                  415: "Content type other than application/json or multipart/form-data",
                  503: "Overloaded: the request waited past the batching latency cap"}
CATALOGUE_ROUTES = ("/metadata", "/prototypes")
# Every prediction and batch row (inference/domain.py); null when the bundle has no calibration.
DOMAIN_FIELDS = {
    "in_domain": {"type": "boolean", "nullable": True,
                  "description": "Is the input like the model's validation images (its distances to the "
                                 "prototypes within the threshold calibrated at export)"},
    "typicality": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True,
                   "description": "The share of validation images further from the prototypes (1 typical, "
                                  "0 beyond all of them)"},
}
TASK_ROUTE = "/score_batch"


def image_schema(manifest: Manifest) -> dict:
    """IMAGE: a base64 PNG/JPEG string or a numeric array of exactly the model's input size."""
    spec = manifest.input
    low, high = spec.value_range
    pixel = {"type": "number", "minimum": low, "maximum": high}

    def rows_of(item: dict, n: int) -> dict:
        return {"type": "array", "items": item, "minItems": n, "maxItems": n}

    plane = rows_of(rows_of(pixel, spec.width), spec.height)
    variants = [{"type": "string", "minLength": 1, "title": "base64 PNG/JPEG",
                 "description": "A PNG or JPEG file, base64-encoded (a data: URL prefix is accepted)."}]
    if spec.channels == 1:
        variants.append({**plane, "title": f"[{spec.height}][{spec.width}] array"})
    variants.append({**rows_of(plane, spec.channels),
                     "title": f"[{spec.channels}][{spec.height}][{spec.width}] array"})
    return {"oneOf": variants, "description": f"One image. Arrays: values in [{low:g}, {high:g}]."}


def request_schemas(manifest: Manifest, max_images: int, max_task_images: int) -> dict[str, dict]:
    """The JSON request bodies by route; fields not listed are ignored."""
    image = image_schema(manifest)
    n_active = sum(1 for row in manifest.prototypes if row.status == "active")
    top_k = {"type": "integer", "minimum": 1, "maximum": n_active, "default": min(3, n_active), "nullable": True,
             "description": "How many nearest active prototypes to return (1 to the number of active ones); "
                            "absent or null: the default."}

    abstain = {"type": "boolean", "nullable": True,
               "description": "Withhold the label of an out-of-domain answer (label and class_name null, "
                              "abstained true, reason out_of_domain). Absent or null: the service setting "
                              "PROTOSERVE_ABSTAIN (default false)."}
    canonicalize = {"type": "boolean", "nullable": True, "default": False,
                    "description": "Make each picture the way the training images were made first (/metadata "
                                   "input.canonical): for photographed or scanned digits. A model without a "
                                   "canonical form refuses true (reason no_canonical_form)."}

    # The batch task scores what it can: an item that is not a valid IMAGE becomes a row with its error.
    task_item = {"description": "An IMAGE; anything else is answered as a row with an error, not refused."}
    task = {"type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": task_item, "minItems": 1, "maxItems": max_task_images},
                           "top_k": top_k, "abstain": abstain}}
    predict_images = {"type": "array", "items": image, "minItems": 1, "maxItems": max_images}
    options = {"abstain": abstain, "canonicalize": canonicalize}
    return {"/predict": {"type": "object", "required": ["images"], "properties": {"images": predict_images,
                                                                                   **options}},
            "/explain": {"type": "object", "required": ["image"],
                         "properties": {"image": image, "top_k": top_k, **options}},
            "/score_batch": task, "/score_batch/submit": task}


def multipart_schema(route: str, json_schema: dict) -> dict:
    """The multipart/form-data variant: image files in "images" ("image" for /explain), top_k a field."""
    binary = {"type": "string", "format": "binary"}
    properties = {}
    if route == "/explain":
        properties["image"] = binary
    else:
        limit = json_schema["properties"]["images"]["maxItems"]
        properties["images"] = {"type": "array", "items": binary, "minItems": 1, "maxItems": limit}
    if "top_k" in json_schema["properties"]:  # a form field is a string: absent means the default, never null
        properties["top_k"] = {k: v for k, v in json_schema["properties"]["top_k"].items() if k != "nullable"}
    for option in ("abstain", "canonicalize"):
        if option in json_schema["properties"]:
            properties[option] = {"type": "string", "enum": ["true", "false", "1", "0"],
                                  "description": json_schema["properties"][option]["description"]}
    return {"type": "object", "required": list(properties)[:1], "properties": properties}


def answer_schemas() -> dict[str, dict]:
    """The 200 answers by route (the fields ARCHITECTURE.md promises; answers may carry more)."""
    probabilities = {"type": "array", "items": {"type": "number"}}
    prediction = {"type": "object", "required": ["label", "class_name", "probabilities", "in_domain", "typicality",
                                                 "abstained"],
                  "properties": {"label": {"type": "integer", "nullable": True,
                                           "description": "null only when the answer abstained"},
                                 "class_name": {"type": "string", "nullable": True},
                                 "probabilities": probabilities, **DOMAIN_FIELDS,
                                 "abstained": {"type": "boolean"},
                                 "reason": {"type": "string", "enum": ["out_of_domain"],
                                            "description": "why the label was withheld (abstentions only)"},
                                 "detail": {"type": "string"}}}
    prototype = {"type": "object", "required": ["id", "class_identity", "distance", "similarity", "weight",
                                                "contribution", "image"],
                 "properties": {"id": {"type": "integer"}, "class_identity": {"type": "integer"},
                                "distance": {"type": "number"}, "similarity": {"type": "number"},
                                "weight": {"type": "number"}, "contribution": {"type": "number"},
                                "image": {"type": "string", "nullable": True}}}
    model = {"$ref": "#/components/schemas/ModelRef"}
    quality = {"type": "object", "nullable": True, "required": ["data", "split", "sample_size", "seed", "figures"],
               "description": "The bundle's explanation-quality report (validation split): each figure with "
                              "its reference; null when the bundle has none."}
    quality_row = {"type": "object", "nullable": True,
                   "description": "This prototype's explanation-quality figures by name (null without a report)."}
    catalogue_row = {"type": "object", "required": ["id", "class_identity", "status"],
                     "properties": {"id": {"type": "integer"}, "class_identity": {"type": "integer"},
                                    "status": {"type": "string", "enum": ["active", "masked"]},
                                    "quality": quality_row}}
    scored = {"type": "object", "required": ["model", "images", "failed", "rows"],
              "properties": {"model": model, "images": {"type": "integer"}, "failed": {"type": "integer"},
                             "rows": {"type": "array", "items": {"type": "object",
                                                                 "required": ["input_id", "error", "in_domain",
                                                                              "typicality"],
                                                                 "properties": DOMAIN_FIELDS}}}}
    return {
        "/predict": {"type": "object", "required": ["model", "predictions"],
                     "properties": {"model": model, "predictions": {"type": "array", "items": prediction}}},
        "/explain": {"type": "object", "required": ["model", "prediction", "prototypes"],
                     "properties": {"model": model, "prediction": prediction,
                                    "prototypes": {"type": "array", "items": prototype}}},
        "/metadata": {"type": "object", "required": ["model", "family", "class_names", "input", "provider"],
                      "properties": {"model": model, "family": {"type": "string"}, "provider": {"type": "string"},
                                     "class_names": {"type": "array", "items": {"type": "string"}},
                                     "input": {"type": "object"}, "quality": quality,
                                     "domain": {"type": "object", "nullable": True,
                                                "description": "The out-of-domain rule calibrated at export "
                                                               "(null: the bundle has none)"}}},
        "/score_batch": scored,
        "/score_batch/get": scored,
        "/prototypes": {"type": "object", "required": ["model", "prototypes"],
                        "properties": {"model": model, "prototypes": {"type": "array", "items": catalogue_row}}},
    }


def components() -> dict[str, dict]:
    model_ref = {"type": "object", "required": ["name", "version"],
                 "properties": {"name": {"type": "string"}, "version": {"type": "string"}}}
    error = {"type": "object", "required": ["error", "reason", "model"],
             "description": "Every refusal: a message naming the problem, a counted reason, the model.",
             "properties": {"error": {"type": "string"},
                            "reason": {"type": "string", "enum": [*REASONS, OVERLOADED]},
                            "model": {"$ref": "#/components/schemas/ModelRef"}}}
    # BentoML's task routes answer these statuses (its own TaskStatusResponse lists other names and
    # fields that submit and retry do not send).
    task_status = {"type": "object", "required": ["task_id", "status"],
                   "properties": {"task_id": {"type": "string"},
                                  "status": {"type": "string", "enum": ["pending", "in_progress", "completed",
                                                                        "failed", "canceled"]},
                                  "created_at": {"type": "string"}, "executed_at": {"type": "string",
                                                                                    "nullable": True}}}
    return {"ModelRef": model_ref, "ProtoserveError": error, "TaskStatusResponse": task_status}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def error_responses(statuses=(400, 413, 415)) -> dict:
    ref = {"$ref": "#/components/schemas/ProtoserveError"}
    return {str(s): {"description": ERROR_STATUSES[s], "content": _json(ref)} for s in statuses}


# The Open Inference Protocol v2 routes (service/open_inference.py): outputs by name, and which need a calibration.
V2_OUTPUTS = ("probabilities", "label", "prototype_ids", "prototype_distances")
V2_DOMAIN_OUTPUTS = ("in_domain", "typicality")
# The 400 reasons a schema-valid infer request can still get: what a schema cannot tie together (a tensor's
# data against its shape, the batch size against N) or say about an image's bytes.
V2_CONTENT_REASONS = (*IMAGE_CONTENT_REASONS, "wrong_shape", "empty_batch", "batch_too_large", "bad_binary_data")
V2_ERROR = {"$ref": "#/components/schemas/V2Error"}


def v2_components() -> dict[str, dict]:
    tensor_metadata = {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                      "shape": {"type": "array", "items": {"type": "integer"},
                                                "description": "-1: varies per request"}}}
    output = {"type": "object", "required": ["name", "datatype", "shape"],
              "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                             "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                             "data": {"type": "array", "description": "row-major, flat"},
                             "parameters": {"type": "object", "properties": {
                                 "binary_data_size": {"type": "integer", "minimum": 0,
                                                      "description": "the tensor's bytes follow the JSON"}}}}}
    return {
        "V2Error": {"type": "object", "required": ["error"],
                    "description": "The protocol's error; reason and model as on the native routes' refusals.",
                    "properties": {"error": {"type": "string"},
                                   "reason": {"type": "string", "enum": [*REASONS, OVERLOADED]},
                                   "model": {"$ref": "#/components/schemas/ModelRef"}}},
        "V2TensorMetadata": tensor_metadata,
        "V2ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                            "properties": {"name": {"type": "string"},
                                           "versions": {"type": "array", "items": {"type": "string"}},
                                           "platform": {"type": "string"},
                                           "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/"
                                                                                         "V2TensorMetadata"}},
                                           "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/"
                                                                                          "V2TensorMetadata"}}}},
        "V2InferResponse": {"type": "object", "required": ["model_name", "outputs"],
                            "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                           "id": {"type": "string"},
                                           "outputs": {"type": "array", "items": output}}},
    }


def v2_infer_request(manifest: Manifest, max_images: int) -> dict:
    """The JSON infer request (the binary data extension's bodies are described in words)."""
    spec = manifest.input
    low, high = spec.value_range
    n_active = sum(1 for row in manifest.prototypes if row.status == "active")
    dims = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    tensor_parameters = {"type": "object", "properties": {"binary_data_size": {
        "type": "integer", "minimum": 0, "description": "binary data extension: the tensor's bytes follow the JSON"}}}
    fp32 = {"type": "object", "required": ["name", "datatype", "shape", "data"], "title": "image: FP32 [N, C, H, W]",
            "properties": {"name": {"type": "string", "enum": ["image"]},
                           "datatype": {"type": "string", "enum": ["FP32"]},
                           "shape": {**dims, "minItems": 4, "maxItems": 4,
                                     "description": f"[N, {spec.channels}, {spec.height}, {spec.width}], N from 1 "
                                                    f"to {max_images}"},
                           "data": {"type": "array", "minItems": 1,
                                    "items": {"type": "number", "minimum": low, "maximum": high},
                                    "description": f"N x {spec.channels * spec.height * spec.width} values in "
                                                   f"[{low:g}, {high:g}], row-major (flat or nested)"},
                           "parameters": tensor_parameters}}
    png = {"type": "string", "minLength": 1, "description": "A PNG or JPEG file, base64-encoded"}
    files = {"type": "object", "required": ["name", "datatype", "shape", "data"], "title": "image_bytes: BYTES [N]",
             "properties": {"name": {"type": "string", "enum": ["image_bytes"]},
                            "datatype": {"type": "string", "enum": ["BYTES"]},
                            "shape": {**dims, "minItems": 1, "maxItems": 1, "description": "[N]"},
                            "data": {"type": "array", "items": png, "minItems": 1, "maxItems": max_images},
                            "parameters": tensor_parameters}}
    names = [*V2_OUTPUTS, *(V2_DOMAIN_OUTPUTS if manifest.domain is not None else ())]
    binary = {"type": "boolean", "description": "send this output as binary data after the JSON"}
    output = {"type": "object", "required": ["name"],
              "properties": {"name": {"type": "string", "enum": names},
                             "parameters": {"type": "object", "properties": {"binary_data": binary}}}}
    parameters = {"type": "object", "properties": {
        "top_k": {"type": "integer", "minimum": 1, "maximum": n_active,
                  "description": "How many nearest active prototypes prototype_ids and prototype_distances hold "
                                 f"(default {min(3, n_active)})"},
        "binary_data_output": {"type": "boolean", "description": "every output as binary data"}}}
    return {"type": "object", "required": ["inputs"],
            "properties": {"id": {"type": "string"}, "parameters": parameters,
                           "inputs": {"type": "array", "minItems": 1, "maxItems": 1,
                                      "items": {"oneOf": [fp32, files]}},
                           "outputs": {"type": "array", "items": output,
                                       "description": "the outputs to send, by name (absent: all)"}}}


def v2_paths(manifest: Manifest, max_images: int, fixed_version: bool = True) -> dict[str, dict]:
    """The /v2 routes (service/open_inference.py); `fixed_version` False (registry mode): the version served
    changes with the registry, so the document names none."""
    def get(summary: str, schema: dict, *errors: int, parameters=()) -> dict:
        responses = {"200": {"description": summary, "content": _json(schema)}}
        responses.update({str(s): {"description": V2_STATUSES[s], "content": _json(V2_ERROR)} for s in errors})
        return {"get": {"summary": summary, "tags": ["Open Inference Protocol v2"], "parameters": list(parameters),
                        "responses": responses}}

    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": [manifest.name]},
            "description": "The served model's name (others: 404)"}
    version = {"name": "version", "in": "path", "required": True,
               "schema": {"type": "string", "enum": [manifest.version]} if fixed_version else {"type": "string"},
               "description": "The served version (in registry mode the active one; others: 404)"}
    ready = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
    model_ready = {"type": "object", "required": ["name", "ready"],
                   "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
    metadata = {"$ref": "#/components/schemas/V2ModelMetadata"}
    paths = {
        "/v2": get("Server metadata", {"type": "object", "required": ["name", "version", "extensions"],
                                       "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                      "extensions": {"type": "array", "items": {"type": "string"}}}}),
        "/v2/health/live": get("Live", {"type": "object", "required": ["live"],
                                        "properties": {"live": {"type": "boolean"}}}),
        "/v2/health/ready": get("Ready (the model loaded and warmed up)", ready),
    }
    request = v2_infer_request(manifest, max_images)
    binary_body = {"type": "string", "format": "binary",
                   "description": "The binary data extension: the JSON (its length in Inference-Header-Content-"
                                  "Length) followed by the outputs asked for with binary_data"}
    for prefix, parameters in (("/v2/models/{name}", [name]), ("/v2/models/{name}/versions/{version}",
                                                                 [name, version])):
        paths[prefix] = get("Model metadata: inputs and outputs from the bundle", metadata, 404,
                            parameters=parameters)
        paths[f"{prefix}/ready"] = get("Model ready", model_ready, 404, parameters=parameters)
        answer = {"description": "The outputs asked for", "content": {
            **_json({"$ref": "#/components/schemas/V2InferResponse"}),
            "application/octet-stream": {"schema": binary_body}}}
        errors = {str(s): {"description": V2_STATUSES[s], "content": _json(V2_ERROR)} for s in V2_STATUSES}
        paths[f"{prefix}/infer"] = {"post": {
            "summary": "Infer: probabilities, label, nearest prototypes (and in_domain, typicality)",
            "description": V2_INFER_DOC, "tags": ["Open Inference Protocol v2"], "parameters": parameters,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {"200": answer, **errors}}}
    return paths


V2_STATUSES = {400: ERROR_STATUSES[400], 404: "No such model or version here (this worker serves one)",
               413: ERROR_STATUSES[413], 415: "Content type other than application/json or application/octet-stream",
               503: ERROR_STATUSES[503]}
V2_INFER_DOC = """Exactly one input: "image", FP32 [N, C, H, W] with values in the model's range (as /predict's
arrays), or "image_bytes", BYTES [N] of PNG/JPEG files (base64 strings in JSON; raw files with the binary
data extension). The binary data extension (header Inference-Header-Content-Length: the JSON's length,
content type application/octet-stream) is taken for inputs ("parameters": {"binary_data_size"}) and
outputs ("binary_data": true, or "binary_data_output": true for all). A schema-valid body can still get
a 400 when its data does not fill its shape, N is outside 1 to the per-request limit, or an image's
bytes are not a decodable PNG/JPEG, or a binary_data_size without the binary body (reason wrong_shape,
empty_batch, batch_too_large, not_an_image, corrupt_image, image_too_large, bad_base64, bad_binary_data)."""


def api_document(spec: dict, manifest: Manifest, max_images: int, max_task_images: int,
                 fixed_version: bool = True) -> dict:
    """BentoML's generated document (a dict) with protoserve's exact request and answer shapes
    (`fixed_version` False: registry mode, the served version follows the registry)."""
    spec = copy.deepcopy(spec)
    for item in spec["paths"].values():  # BentoML keys its responses by int status
        for operation in item.values():
            operation["responses"] = {str(status): answer for status, answer in operation["responses"].items()}
    spec.setdefault("components", {}).setdefault("schemas", {}).update({**components(), **v2_components()})
    paths = spec["paths"]
    paths.update(v2_paths(manifest, max_images, fixed_version))
    for route, schema in request_schemas(manifest, max_images, max_task_images).items():
        operation = paths[route]["post"]
        operation["requestBody"] = {"required": True, "content": {
            **_json(schema), "multipart/form-data": {"schema": multipart_schema(route, schema)}}}
        operation["responses"].update(error_responses())
    paths["/predict"]["post"]["responses"].update(error_responses((503,)))
    for route, schema in answer_schemas().items():
        operation = paths[route].get("post") or paths[route]["get"]
        operation["responses"]["200"]["content"] = _json(schema)
    for route in (f"{TASK_ROUTE}/get", f"{TASK_ROUTE}/retry"):
        operation = paths[route].get("get") or paths[route]["post"]
        operation["responses"]["409"] = {"description": "The task has not finished: poll /score_batch/status",
                                         "content": _json({"$ref": "#/components/schemas/InvalidArgument"})}
    # `bentoml serve` cannot cancel a task (it answers 400 to every call); ScoreGate answers 404.
    paths.pop(f"{TASK_ROUTE}/cancel", None)
    for route in CATALOGUE_ROUTES:
        post = paths[route]["post"]
        post["requestBody"] = {"required": False, "content": _json({"type": "object"})}
        post["responses"].update(error_responses((400, 413, 415)))
        get = {k: v for k, v in post.items() if k != "requestBody"}
        paths[route]["get"] = {**copy.deepcopy(get), "operationId": f"{post['operationId']}_get"}
    return spec
