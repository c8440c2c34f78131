"""Text-attributed graphs (TAGs) for zero-shot node classification: the TAG format and checks (tag.py), builders
(synthetic.py, debian.py), data kind ``graph`` (data.py) and task kind ``tag_zero_shot`` (task.py), registered
by config.py."""
