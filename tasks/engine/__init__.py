"""The task engine: states, transitions, admission, workers, the supervisor and its maintenance.

See docs/engine.md.
"""
