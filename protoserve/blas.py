"""numpy's BLAS on one thread, in processes whose parallelism is their own (ONNX Runtime sessions side by
side, service workers).

numpy's wheels bring OpenBLAS, which spreads a matrix product over every core once it is large
enough (the out-of-domain rule's Mahalanobis parts on a batch), and its threads keep spinning after
each product, taking the cores the one-thread ONNX Runtime sessions beside them need. The products
are too small to gain from more threads, so one is enough.
"""

from __future__ import annotations


def one_blas_thread() -> None:
    """Limit numpy's BLAS to one thread for the rest of the process (threadpoolctl; no-op without BLAS)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
