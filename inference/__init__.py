"""Running a bundle without torch, shared by the service and batch scoring: the loaded model,
preprocessing of uploads, and the numerics and pictures of an answer."""
