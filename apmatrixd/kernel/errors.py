"""KernelError: the kernel (or its sysfs) refused, with errno and attribute kept intact."""

from __future__ import annotations

import errno as errnolib
import os

from apmatrixd.core.errors import ApmatrixError


class KernelError(ApmatrixError):
    """A sysfs read or write failed; ``errno`` and ``path`` say which and why.

    The D-Bus layer maps this to ``org.apmatrix.Apmatrix1.Error.Kernel``; its text is what an
    admin sees, so it names the attribute, what was written, and the kernel's errno.
    """

    name = "Kernel"

    def __init__(self, errno: int, path: str, op: str, detail: str = "") -> None:
        self.errno = errno
        self.path = path
        self.op = op
        self.detail = detail or os.strerror(errno)
        super().__init__(self._text())

    def _text(self) -> str:
        code = errnolib.errorcode.get(self.errno, str(self.errno))
        if self.op.startswith("writing"):
            where = f"kernel refused {self.op} to {self.path}"
        else:
            where = f"{self.op} {self.path} failed"
        if self.detail == os.strerror(self.errno):
            return f"{where}: [Errno {self.errno}] {self.detail}"
        return f"{where}: {self.detail} ({code})"

    @classmethod
    def from_oserror(cls, err: OSError, path: str, op: str) -> KernelError:
        """Keep the errno exactly; an OSError without one (never from sysfs) counts as EIO."""
        code = err.errno if err.errno is not None else errnolib.EIO
        return cls(code, path, op)


class LockBusy(ApmatrixError):
    """The s390 configuration lock stayed held (D-Bus ``Busy``): nothing was written."""

    name = "Busy"

    def __init__(self, path: str, waited: float) -> None:
        self.path = path
        super().__init__(
            f"the s390 AP configuration lock {path} is held by another process"
            f" (chzdev, ap-check?) and was not released within {waited:.0f} s; nothing written"
        )


class KernelTimeout(KernelError):
    """A write the kernel holds on to (``remove`` of an mdev a guest keeps open) did not
    return in time; it goes on in the kernel and finishes when the guest lets go."""

    name = "Timeout"

    def __init__(self, path: str, waited: float, why: str) -> None:
        super().__init__(errnolib.ETIMEDOUT, path, "writing", f"{why} (waited {waited:g} s)")
