"""Features layer: what turns photos into feature vectors outside a cache's build.

Converted backbone networks kept on disk and run one image per inference request (`networks`), and backbone
weights found by their digest on a search path rather than by the path they were recorded at (`weights`).
It imports only from the flat modules below it (backbones, runtimes, images), never from workflows or the
service."""
