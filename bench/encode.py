"""stub"""


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("encode: not written yet")
