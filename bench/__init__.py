"""The benchmark harness: this engine and its peers, side by side, on one image.

``python -m bench`` builds an EROFS image of a real tree, pushes it to a
local registry behind an emulated network link, serves it with this engine
(cold, warm, offline) and with the peers a user would pick instead (nbdkit
curl, with and without its cache, nbdkit file, nbd-server, one whole-blob
GET), runs the same workloads on each, and writes JSON, a Markdown table and
PNG plots. See bench/README.md.
"""
