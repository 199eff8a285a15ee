"""What a failed revision job tells its reviewer: one sentence per kind of failure, saying what failed and
what to change. The sentence is the job's `reason` (GET /review/api/jobs/{id}, the review page); the
technical detail (exception type, message, traceback) goes to the job's log, and to its `error`.

The worker (worker/loop.py, through revision/revise.py `failure_kind`) and the registry's store (a job whose
workers died) both take their sentence from here. Torch-free: the store is on the serving side.
"""

from __future__ import annotations

FAILURES = {
    "parity": "The revised model's export failed its parity check with PyTorch; retry, or report it with the "
              "job's log.",
    "verification": "The revised model's bundle failed verification (checksums or golden probe); retry, or report "
                    "it with the job's log.",
    "checkpoint": "A checkpoint the revision needs (the parent's, or the job's last finished round) is missing or "
                  "unreadable; register the parent again with its checkpoint, then start a new revision.",
    "parent": "The parent version cannot be revised (it is no longer registered, or has no checkpoint); start the "
              "revision from a version registered with its checkpoint.",
    "verdicts": "The job's verdicts do not fit the parent version (a prototype it does not have); withdraw them "
                "and judge the parent's own prototypes.",
    "train_subset": "The training subset of {images} images has no example of class {classes}, which the "
                    "model's prototypes stand for; use a larger train_subset.",
    "data": "The worker could not load the training data; check the worker's data root (PROTOSERVE_DATA_ROOT) "
            "and the job's train_subset, then start a new revision.",
    "memory": "The worker ran out of memory; start a new revision with a smaller train_subset or batch_size.",
    "worker_lost": "The worker running this job stopped more than once (killed, or out of memory); start a new "
                   "revision, with a smaller train_subset if the worker's machine is short of memory.",
    "other": "The revision failed unexpectedly; retry, or report it with the job's log.",
}


def failure_reason(kind: str, **details) -> str:
    """The sentence a reviewer reads for a failure of this kind (an unknown kind reads as "other"), its
    blanks filled from `details` (the exception's)."""
    sentence = FAILURES.get(kind, FAILURES["other"])
    try:
        return sentence.format(**details)
    except (KeyError, IndexError):  # details missing: the sentence still says what to change
        return sentence
