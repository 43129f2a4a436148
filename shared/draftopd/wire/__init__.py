"""Torch-free pieces the services share: job specs, small formats, and the two client modules.

``registry_client`` (httpx) and ``rollout_queue`` (redis) are the only modules of the library that
import a network client; a test (tests/unit/test_layout.py) holds every other module to that.
"""
