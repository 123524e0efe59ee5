"""stub"""


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("batching: not written yet")
