"""numpy's BLAS on one thread, in processes whose parallelism is their own (ONNX Runtime sessions side by
side, service workers).

numpy's wheels bring OpenBLAS, which runs a matrix product over [N, 55] (the out-of-domain rule's
Mahalanobis parts) on every core once N is above ~90, and its threads keep spinning after each
product. Beside the scoring job's one-thread sessions that cost 40% of the job's wall time on this
2-core machine (README "Batch scoring"); the products are too small to gain from more threads.
"""

from __future__ import annotations


def one_blas_thread() -> None:
    """Limit numpy's BLAS to one thread for the rest of the process (threadpoolctl; no-op without BLAS)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
