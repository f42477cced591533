"""The contract between the controller and its workers, imported by both sides (no torch).

- :mod:`.settings`: what each role is told at start-up (typed, made from the config tree);
- :mod:`.ops`: the request and response of every worker op;
- :mod:`.dataflow`: each task, the role and op that serve it, the columns it consumes and
  produces -- from which the controller registers the index's tasks and stage loops.
"""
