"""dummy: moves a request through the whole pipeline without any data.

Client side it emits ``dummy <path>``; node side it stores nothing and
succeeds.  Use it to test a new client/node pair end to end.
"""


def check_path(ctx, module, path):
    return path


def prepare(ctx, module, path):
    yield 'dummy', f'dummy {ctx.timestamp} {path}'


def handle(ctx, rest):
    ctx.log.info('dummy request from %s: %s', ctx.client, rest)
    return {'stored': None, 'fetched': False}
