"""O_DIRECT reads: weights come from the device every time, never from (or into) the page cache.

posix_fadvise(DONTNEED) evicts after the fact; O_DIRECT bypasses the cache, as a phone's flash
streaming runtime would. The kernel requires the buffer, the file offset and the length to be
aligned to the logical block size, so reads are widened to whole 4096-byte pages into a page-aligned
buffer (anonymous mmap memory is page-aligned) and the wanted bytes are copied out. Filesystems that
refuse O_DIRECT (tmpfs, some overlay and network filesystems) are detected when opening or on the
first read; the caller then falls back to buffered reads with page-cache eviction and says so.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

import numpy as np

ALIGN = 4096
DIRECT_FLAG = "--direct-io"


class DirectIOUnsupported(OSError):
    """The filesystem (or OS) refuses O_DIRECT for this file."""


def open_direct(path) -> int:
    """An O_DIRECT file descriptor for `path`, or DirectIOUnsupported naming why not."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        raise DirectIOUnsupported(errno.ENOTSUP, "this OS has no O_DIRECT")
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise DirectIOUnsupported(e.errno, f"the filesystem of {path} refuses O_DIRECT ({e.strerror})") from None
        raise


def aligned_span(offset: int, n: int) -> tuple[int, int]:
    """(start, length) of the whole pages covering bytes [offset, offset + n)."""
    lo = offset - offset % ALIGN
    hi = -(-(offset + n) // ALIGN) * ALIGN
    return lo, hi - lo


class DirectReader:
    """pread through an O_DIRECT descriptor with page-aligned buffers (one per thread, grown as needed)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._local = threading.local()

    def _buffer(self, size: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = self._local.buf = mmap.mmap(-1, max(size, 1 << 20))
        return buf

    def read(self, offset: int, n: int) -> tuple[np.ndarray, int]:
        """(the n bytes at offset, bytes transferred from the device: whole pages)."""
        lo, size = aligned_span(offset, n)
        buf = self._buffer(size)
        view, need, got = memoryview(buf), offset + n - lo, 0
        try:
            while got < need:
                k = os.preadv(self.fd, [view[got:size]], lo + got)
                if k <= 0:
                    break
                got += k
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise DirectIOUnsupported(e.errno, f"O_DIRECT read refused ({e.strerror})") from None
            raise
        finally:
            view.release()
        out = np.frombuffer(buf, np.uint8, count=min(got, need) - (offset - lo), offset=offset - lo).copy() \
            if got > offset - lo else np.zeros(0, np.uint8)
        return out, got
