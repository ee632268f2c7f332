"""Shared test configuration: hypothesis profiles.

"ci": derandomised (the same examples on every run), no deadline, prints a reproduction blob.
"dev": random examples, no deadline.  Select with HYPOTHESIS_PROFILE (default "dev").
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
