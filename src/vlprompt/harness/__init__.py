"""The experiment harness: run folders, the pipeline of one run, the papers' protocols, reports and the CLI.

It is built on the library (``backbone``, ``data``, ``methods``, ``features``, ``training``, ``evaluation``,
``prediction``); nothing in the library imports from here.
"""
