"""The pieces of bench/peers.py (apo against TRL's GRPOTrainer and A2POTrainer), the command itself
staying in bench/peers.py:

- settings: methods, modes, run sizes, random-model shapes, the option parsers;
- scoring: the training clock, held-out accuracy and KL every method is scored with;
- memory: resident set and the MB a model's tensors hold;
- runners: one method's run in a child process, and the parent's side of starting it;
- measures: each mode's sweep over children, its best points, and the targets;
- report: the printed summary, the race plot, the machine.
"""
