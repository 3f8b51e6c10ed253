"""Entry point for `mitmdump -s kimi_rotate.py` / `mitmweb -s kimi_rotate.py`.

The addon lives in the kimi_rotator package; this file only hands it to mitmproxy.
"""

from kimi_rotator.addon import KimiRotate

addons = [KimiRotate()]
