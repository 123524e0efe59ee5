"""stub"""


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("all: not written yet")
