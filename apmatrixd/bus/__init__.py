"""The D-Bus face of apmatrixd: names, the authorising base, the exported objects and tree."""
