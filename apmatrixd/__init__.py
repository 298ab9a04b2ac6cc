"""apmatrixd: keeps IBM Z AP matrices (vfio_ap mediated devices) conflict-free."""

__version__ = "0.2.0"
