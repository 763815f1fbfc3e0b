"""Locust load shapes (loadtests/README.md): add one to the locustfile, e.g.
``-f loadtests/locustfile.py,loadtests/shapes/step.py``. Each stops the run by itself."""
