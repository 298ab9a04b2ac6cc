"""apmatrixctl: the command line of apmatrixd, a D-Bus client only (never sysfs, never the service).

One module per group of verbs (:mod:`matrices`, :mod:`host`, :mod:`monitor`, :mod:`mdevctl`),
the pictures in :mod:`picture`, the wire in :mod:`client`, the parser in :mod:`main`.
"""
