"""Pure core: facts, decisions and the ports the rest implements; no I/O."""
