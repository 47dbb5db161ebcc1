#!/usr/bin/env python
"""The trajectory editor: draw tracks in the browser, preview the motion, generate, download.

    python sat/app.py                                   # the default model of configs/tora/app.yaml
    python sat/app.py --base configs/tora/model/cogvideox_5b_tora.yaml configs/tora/inference.yaml \\
        --load ckpts/tora/t2v [key=value ...]           # any model, stacked as in sample_video.py

Serves on 127.0.0.1 (``--listen HOST`` to serve elsewhere, e.g. 0.0.0.0); never a share link.
"""
import argparse
import logging
import sys
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from tora.config import ConfigError, parse_cli  # noqa: E402
from tora.editor_app import DEFAULT_SETTINGS, Session, load_settings  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=str(DEFAULT_SETTINGS), help="app settings (default model, page, server)")
    p.add_argument("--base", nargs="+", metavar="YAML", help="model config files, as sample_video.py "
                   "(default: model.base of the settings)")
    p.add_argument("--load", help="DiT checkpoint, as sample_video.py (default: model.load of the settings)")
    p.add_argument("--listen", metavar="HOST", help="address to serve on (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: server.port)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model config overrides")
    return parse_cli(p, argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    options = parse_args(argv)
    try:
        settings = load_settings(options.settings)
        session = Session(settings, options.base or (), options.load, options.overrides, options.device)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        logging.getLogger("app").error("%s", err)
        sys.exit(1)
    from tora.editor_page import serve

    host, port = options.listen or settings.server.host, options.port or settings.server.port
    logging.getLogger("app").info("serving the trajectory editor on http://%s:%d (%s)", host, port,
                                  session.model_description())
    serve(session, host, port)


if __name__ == "__main__":
    main()
