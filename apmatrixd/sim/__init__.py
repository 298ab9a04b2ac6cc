"""The emulated kernel: an LPAR's AP bus and the vfio_ap driver, with the kernel's rules.

Deliberately independent of ``apmatrixd.core``: it is the second implementation the
registry is checked against, so it must never import it.
"""
