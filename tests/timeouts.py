"""How long a test waits for a process or an event before it calls it hung.

Never a measure of speed: on a 2-core machine that other work keeps busy, a step that takes seconds
alone can take many minutes, so a wait only ends a test that would otherwise never end. Tests wait
for events (a file, a logged step, a process exit), not for time to pass.
"""

HANG_S = 3600
