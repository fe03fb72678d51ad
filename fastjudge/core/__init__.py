"""The Python face of the C++ core (`fastjudge._C`): token sampling, final-answer extraction, normalization and
the majority vote, each with a pure-Python reference."""
