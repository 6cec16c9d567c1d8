"""Reading the CIFAR tarballs and the Tiny ImageNet zip without trusting them.

Members are read straight from the archive into memory; nothing is extracted, so no member can
write outside the dataset folder. An archive with a member that would land outside the folder it
unpacks into (an absolute path, a `..` that climbs out, a link pointing out, a device file) is
refused as a whole before anything is read: such an archive is not the published one.

CIFAR batches are pickles. They are loaded with an unpickler that can build only plain
containers and numpy arrays, so a crafted pickle cannot run code even when checksums are waived.
"""
import contextlib
import io
import pickle
import posixpath
import tarfile
import zipfile

import numpy as np

from util import UsageError

# What the real CIFAR pickles reference: numpy 1 names (the published files, pickled by Python 2)
# and their numpy 2 spelling (files pickled today). The array rebuilder is taken from how numpy
# pickles an array, so numpy's deprecated `numpy.core` module is never imported.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def open_tar(path):
    """The tarfile at `path`, after every member passed `check_member_name` and is a plain file,
    folder or a link that stays inside."""
    try:
        tar = tarfile.open(path, "r:*")
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UsageError(f"{path} is not a readable tar archive ({error}); fetch it "
                         "again") from None
    with _closed_if_refused(tar):
        for member in members:
            _check_tar_member(path, member)
    return tar


def _check_tar_member(path, member):
    check_member_name(path, member.name)
    if member.issym() or member.islnk():
        target = posixpath.join(posixpath.dirname(member.name), member.linkname) \
            if member.issym() else member.linkname
        check_member_name(path, target, f"link {member.name} -> {member.linkname}")
    elif not (member.isfile() or member.isdir()):
        raise UsageError(f"refusing {path}: member {member.name} is a device or pipe, not a "
                         "file; the archive is not the published one")


@contextlib.contextmanager
def _closed_if_refused(archive):
    try:
        yield
    except UsageError:
        archive.close()
        raise


def read_tar_member(tar, path, name):
    member = tar.extractfile(name) if name in tar.getnames() else None
    if member is None:
        raise UsageError(f"{path} lacks {name}; it is not the published archive — fetch it again")
    return member.read()


def open_zip(path):
    """The zipfile at `path`, after every member name passed `check_member_name`."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UsageError(f"{path} is not a readable zip archive ({error}); fetch it "
                         "again") from None
    with _closed_if_refused(archive):
        for name in archive.namelist():
            check_member_name(path, name)
    return archive


def check_member_name(archive, name, what=None):
    """Refuses a member path that is absolute or climbs out of the folder it unpacks into."""
    normalized = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        reason = "is an absolute path"
    elif normalized == ".." or normalized.startswith("../"):
        reason = "points outside the folder it unpacks into"
    else:
        return
    raise UsageError(f"refusing {archive}: {what or 'member ' + name} {reason}; the archive is "
                     "not the published one")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR batch never "
                                     "does")


def load_pickle(data, what):
    """Unpickles the bytes of a CIFAR batch (Python 2 pickles: byte-string keys)."""
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise UsageError(f"refusing to unpickle {what}: {error}; it is not a published CIFAR "
                         "batch") from None
