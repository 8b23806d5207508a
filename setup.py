"""Build entry point. Everything is declared in pyproject.toml; compiled extensions join here."""

from setuptools import setup

setup()
