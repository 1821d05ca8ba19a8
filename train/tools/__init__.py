"""The commands built on the training code, each one module or subpackage with a thin command-line front:
``plan`` (mimo-plan), ``convert`` (mimo-convert), ``evaluate`` (mimo-eval), ``compare_layouts``."""
