"""The one base class for errors a user can act on.

Every part raises a subclass where it finds the problem; the CLI turns any of them into one
line on stderr and a non-zero exit, the service into a 4xx. Anything else is a bug.
"""


class ProtoserveError(Exception):
    """A problem with the user's input, files or configuration, with a message they can act on."""

# Every reason a request can be refused for: the values of protoserve_rejected_inputs_total{reason}.
REASONS = (
    "invalid_json",  # the body does not parse as JSON
    "malformed_multipart",  # a multipart/form-data body that does not parse
    "unsupported_media_type",  # neither application/json nor multipart/form-data
    "wrong_type",  # a JSON field of the wrong type (images not a list, top_k a string, ...)
    "missing_field",  # no "images" / "image"
    "empty_batch",
    "batch_too_large",
    "body_too_large",  # 413 from the body-size middleware
    "not_an_image",  # bytes that are neither PNG nor JPEG
    "corrupt_image",  # a PNG/JPEG that is truncated or damaged
    "image_too_large",  # dimensions over the limit (decompression bombs included)
    "bad_base64",
    "wrong_shape",  # a numeric array that is not [H][W] or [C][H][W] of the model's size
    "non_finite",  # NaN or infinity in an array
    "out_of_range",  # array values outside the manifest's value range
    "top_k_out_of_range",
    "no_canonical_form",  # "canonicalize" asked of a model whose input spec has no canonical form
    # Open Inference Protocol v2 (service/open_inference.py)
    "bad_binary_data",  # the binary tensor data extension's sizes do not match the body
    "unknown_tensor",  # an input or requested output the model does not have
    "unknown_model",  # a model name or version this service does not serve (404)
)


class InputError(ProtoserveError):
    """A request the service refuses: HTTP status, a counted reason, and a message naming the problem."""

    def __init__(self, reason: str, message: str, status: int = 400):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.status = status

    def body(self) -> dict:
        return {"error": str(self), "reason": self.reason}
