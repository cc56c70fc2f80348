"""Datasets: ``load(name) -> Dataset`` with NHWC float32 images in [0, 1] and int32 labels.

Names as the command line and configs spell them: ``digits``, ``fashion_mnist``, ``cifar10``.
Images are *not* mean/std normalised: the models start with a conv followed by BatchNorm, which
absorbs the scale, and keeping [0, 1] makes the data easy to inspect and to export.

Where files are searched (first hit wins), for ``fashion_mnist`` and ``cifar10``:

1. ``data_dir`` passed to :func:`load` (``--data-dir`` on the command line);
2. ``$FACTORIZE_DATA_DIR``;
3. the dataset's system directory (Debian's ``dataset-fashion-mnist`` installs
   ``/usr/share/datasets/fashion-mnist``);
4. the cache ``$XDG_CACHE_HOME/factorize`` (default ``~/.cache/factorize``).

If none has the files, :func:`load` downloads them from the official release into the cache
(``download=False`` turns this off) and verifies their checksums before use.
"""

from __future__ import annotations

from factorize.data.datasets import (
    DATASETS,
    Dataset,
    DatasetError,
    cache_dir,
    load,
    search_dirs,
)

__all__ = ["DATASETS", "Dataset", "DatasetError", "cache_dir", "load", "search_dirs"]
