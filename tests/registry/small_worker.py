"""`protoserve worker ARGS...` with each candidate's explanation-quality report and nearest training images
at the tiny bundles' size (tiny_configs.py), as test_revision_matrix.py does in process: the worker-pool
test measures the registry's coordination, and at full size these two are most of a mask job's time."""

import functools
import sys

from tiny_configs import TINY_QUALITY_OPTIONS

import revision.revise
from cli.main import main
from export.quality.report import QualityOptions

revision.revise.export_bundle = functools.partial(revision.revise.export_bundle,
                                                  quality=QualityOptions(**TINY_QUALITY_OPTIONS))
revision.revise.write_neighbours = functools.partial(revision.revise.write_neighbours, limit=500)

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
