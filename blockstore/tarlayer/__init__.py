"""Ordinary image layers (tar, tar+gzip, tar+zstd) mounted lazily as EROFS.

A tar layer is served as one device, ``metadata || zeros || uncompressed tar``:
the metadata is an EROFS image written here whose files point at their bytes in
the tar, so the kernel reads file data straight out of the tar; the zeros keep
the kernel's readahead off the metadata's end out of the tar.
"""
