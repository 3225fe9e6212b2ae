import logging
import os
import sys

# Helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
