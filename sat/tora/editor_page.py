"""The Gradio page of the trajectory editor: layout and wiring only (the work is in ``editor_app.Session``).

Imported only by ``sat/app.py``: importing it sets ``GRADIO_ANALYTICS_ENABLED=False`` before Gradio
loads, and nothing here downloads anything (system fonts, no share link, no server-side rendering).
"""
from __future__ import annotations

import os
import threading

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no usage reports

import gradio as gr  # noqa: E402

from .editor_app import STATIC, Reply, Session  # noqa: E402
from .tracks import TIMING_MODES  # noqa: E402

TIMING_LABELS = {"as_drawn": "as drawn", "uniform": "uniform speed", "ease": "ease in/out"}

# The editor's state comes from the browser: every button reads it through this hook first.
READ_EDITOR = "(state, ...rest) => [window.toraEditor ? window.toraEditor.serialize() : state, ...rest]"
LOAD_EDITOR = "(payload) => { if (window.toraEditor && payload) window.toraEditor.load(payload); return []; }"
CSS = """
.tora-hidden { display: none !important; }
#tora-editor-root canvas { max-width: 100%; height: auto; cursor: crosshair; border: 1px solid #888; }
"""


def editor_head() -> str:
    return f"<script>\n{(STATIC / 'editor.js').read_text()}\n</script>"


def build_page(session: Session) -> gr.Blocks:
    settings = session.settings.generate
    frames = session.frame_choices()
    with gr.Blocks(title="Tora trajectory editor", analytics_enabled=False) as page:
        gr.Markdown(f"## Tora trajectory editor\n{session.model_description()}")
        payload = gr.Textbox(visible="hidden", elem_id="editor-payload", elem_classes="tora-hidden")
        state = gr.Textbox(visible="hidden", elem_id="editor-state", elem_classes="tora-hidden")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                gr.HTML('<div id="tora-editor-root"></div>', elem_id="tora-editor", js_on_load=None)
                gr.Markdown("Click to add points to the selected track, drag for freehand; drag a point to "
                            "move it, double-click it to delete it. **New track** starts another object; "
                            "**Static point** marks an object that stays put.")
                image = gr.File(label=("First frame (image-to-video: required)" if session.image2video else
                                       "Reference image (drawing background only: this model is text-to-video)"),
                                file_types=["image"], elem_id="image-upload")
                with gr.Row():
                    preset = gr.Dropdown(session.presets(), label="Preset from trajs/", value=None)
                    add_preset = gr.Button("Add preset")
                with gr.Accordion("Import / export", open=False):
                    imports = gr.File(label="Point files (.txt), tracks JSON, tracks.npy + visibility.npy",
                                      file_count="multiple", elem_id="import-files")
                    import_button = gr.Button("Import")
                    export_button = gr.Button("Export tracks", elem_id="export-btn")
                with gr.Accordion("Motion transfer from a reference clip", open=False):
                    clip = gr.File(label="Reference clip", file_types=["video"], elem_id="clip-upload")
                    clip_frame = gr.Image(label="First frame: click to add start points", interactive=False)
                    starts = gr.Textbox(label="Start points (x,y clip pixels, one per line; empty = N moving points)",
                                        lines=3)
                    count = gr.Number(value=3, precision=0, label="N points where it moves", elem_id="transfer-count")
                    transfer_button = gr.Button("Track the clip", elem_id="transfer-btn")
            with gr.Column(scale=2):
                timing = gr.Radio([(TIMING_LABELS[mode], mode) for mode in TIMING_MODES], value=TIMING_MODES[0],
                                  label="Timing along each track")
                num_frames = gr.Radio(frames, value=frames[-1], label="Frames", elem_id="frames")
                preview_button = gr.Button("Preview motion", elem_id="preview-btn")
                preview = gr.Video(label="Preview: per-frame points | motion video (flow colours)",
                                   elem_id="preview-out", autoplay=True, loop=True)
                prompt = gr.Textbox(settings.prompt, label="Prompt", lines=2, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(settings.seed, precision=0, label="Seed")
                    steps = gr.Number(settings.steps, precision=0, label="Steps", elem_id="steps")
                    guidance = gr.Number(settings.guidance, label="Guidance")
                recipe = gr.Dropdown(session.recipes(), value=session.recipes()[0], label="Memory recipe")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
        with gr.Row():
            video = gr.Video(label="Video", elem_id="video-out", autoplay=True, loop=True)
            overlay = gr.Video(label="Video with the tracks", elem_id="overlay-out", autoplay=True, loop=True)
        downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")

        def show(reply: Reply, *wanted):
            values = {"status": reply.message, "payload": reply.payload if reply.payload is not None else gr.update(),
                      "files": reply.files or gr.update(), "video": reply.videos[0] or gr.update(),
                      "overlay": reply.videos[1] or gr.update()}
            return [values[name] for name in wanted]

        payload.change(None, [payload], None, js=LOAD_EDITOR)
        page.load(session.initial_payload, None, payload)
        image.change(lambda path: show(session.set_image(path), "status", "payload"), [image], [status, payload])
        add_preset.click(lambda name: show(session.load_preset(name), "status", "payload"), [preset], [status, payload])
        import_button.click(lambda paths: show(session.import_files(paths), "status", "payload"),
                            [imports], [status, payload])
        export_button.click(lambda s, t, f: show(session.export(s, t, f), "status", "files"),
                            [state, timing, num_frames], [status, downloads], js=READ_EDITOR)
        preview_button.click(lambda s, t, f, i: show(session.preview(s, t, f, i), "status", "payload", "video"),
                             [state, timing, num_frames, image], [status, payload, preview], js=READ_EDITOR)

        def on_generate(s, t, f, p, sd, st, g, r, i, progress=gr.Progress()):
            progress(0, desc="denoising")
            reply = session.generate(s, t, f, p, sd, st, g, r, i,
                                     progress=lambda step, total: progress((step, total), desc="denoising"))
            return show(reply, "status", "files", "video", "overlay")

        generate_button.click(on_generate, [state, timing, num_frames, prompt, seed, steps, guidance, recipe, image],
                              [status, downloads, video, overlay], js=READ_EDITOR, concurrency_limit=1)

        def on_clip(path):
            frame, message = session.clip_first_frame(path)
            return frame, message, ""

        def on_clip_click(text, event: gr.SelectData):
            x, y = event.index
            return (text.rstrip("\n") + "\n" if text.strip() else "") + f"{x},{y}"

        clip.change(on_clip, [clip], [clip_frame, status, starts])
        clip_frame.select(on_clip_click, [starts], [starts])
        transfer_button.click(lambda c, s, n: show(session.transfer(c, s, n), "status", "payload"),
                              [clip, starts, count], [status, payload])
    return page


def serve(session: Session, host: str, port: int, block: bool = True):
    """Serve the page on ``host:port``: no share link, system fonts, nothing fetched from outside."""
    page = build_page(session)
    session.output_root.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=session.warm_up, name="build-model", daemon=True).start()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return page.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False,
                               prevent_thread_lock=not block, allowed_paths=[str(session.output_root)],
                               ssr_mode=False, mcp_server=False, show_error=False, quiet=True,
                               theme=theme, css=CSS, head=editor_head())
