"""The commands, one module each, each with one entry function: `main(argv) -> exit
code`, and `build_parser()` for its --help and the man page."""
