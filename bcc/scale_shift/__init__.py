"""scale-shift: learned corrections of reused block values (parameters and training)."""
