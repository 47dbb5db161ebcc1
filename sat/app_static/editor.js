// The trajectory editor of sat/app.py: a canvas on which tracks are drawn with the mouse.
//
// Talks to Python through two JSON strings (see sat/tora/editor_app.py):
//   toraEditor.serialize() -> {"editor_size": [w, h], "tracks": [{"points": [[x, y], ...], "static": bool}]}
//       read by every button before its Python function runs; points are editor (canvas) pixels.
//   toraEditor.load(payload) <- {"width", "height", "replace", "background" (data URL or null = keep),
//       "tracks" (as above), "animation" ([track][frame] = [x, y] or null), "colours", "freehand_interval_ms"}
//
// Mouse: click = add a point to the selected track (a new track if none is selected); hold and drag =
// freehand, a point recorded every freehand_interval_ms (pauses included, so "as drawn" timing follows
// the hand); drag an existing point = move it; double-click a point = delete it.
(function () {
  "use strict";

  const HIT_RADIUS = 7;      // px: a press this close to a point grabs it
  const DRAG_START = 3;      // px: a press that moves further becomes a freehand stroke
  const MAX_HISTORY = 100;

  const editor = {
    width: 576, height: 384, tracks: [], selected: -1, mode: "draw",
    colours: ["#ff0101", "#016eff", "#ffc801", "#be01ff", "#01c8c8", "#ff7801"],
    intervalMs: 40, background: null, history: [], animation: null, frame: 0,
    root: null, canvas: null, pending: null, gesture: null, mouse: null,
  };

  // -- state -------------------------------------------------------------------------------------
  function snapshot() {
    editor.history.push(JSON.stringify({ tracks: editor.tracks, selected: editor.selected }));
    if (editor.history.length > MAX_HISTORY) editor.history.shift();
    editor.animation = null; // the preview no longer matches
  }

  function undo() {
    const last = editor.history.pop();
    if (!last) return;
    const saved = JSON.parse(last);
    editor.tracks = saved.tracks;
    editor.selected = saved.selected;
    render();
  }

  function colour(index) { return editor.colours[index % editor.colours.length]; }

  function newTrack(isStatic) {
    editor.tracks.push({ points: [], static: !!isStatic });
    editor.selected = editor.tracks.length - 1;
    return editor.tracks[editor.selected];
  }

  function nearestPoint(p) {
    // The selected track wins ties, so its points stay grabbable under other tracks.
    let best = null;
    editor.tracks.forEach((track, t) => track.points.forEach((q, i) => {
      const d = Math.hypot(q[0] - p[0], q[1] - p[1]) - (t === editor.selected ? 0.5 : 0);
      if (d <= HIT_RADIUS && (!best || d < best.d)) best = { track: t, index: i, d: d };
    }));
    return best;
  }

  function clampPoint(p) {
    return [Math.min(Math.max(p[0], 0), editor.width - 0.01), Math.min(Math.max(p[1], 0), editor.height - 0.01)];
  }

  // -- mouse -------------------------------------------------------------------------------------
  function eventPoint(event) {
    const rect = editor.canvas.getBoundingClientRect(); // the canvas may be shown scaled
    return clampPoint([(event.clientX - rect.left) * editor.width / rect.width,
                       (event.clientY - rect.top) * editor.height / rect.height]);
  }

  function onDown(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    const p = eventPoint(event);
    editor.mouse = p;
    const hit = nearestPoint(p);
    snapshot();
    if (hit) {
      editor.selected = hit.track;
      editor.gesture = { kind: "move", track: hit.track, index: hit.index };
    } else if (editor.mode === "static") {
      newTrack(true).points.push(p);
      editor.mode = "draw";
      editor.gesture = null;
    } else {
      let track = editor.tracks[editor.selected];
      if (!track || track.static) track = newTrack(false);
      track.points.push(p);
      editor.gesture = { kind: "stroke", track: editor.selected, start: p, drawing: false, timer: null };
    }
    render();
  }

  function onMove(event) {
    if (!editor.gesture) return;
    const p = eventPoint(event);
    editor.mouse = p;
    const g = editor.gesture;
    if (g.kind === "move") {
      editor.tracks[g.track].points[g.index] = p;
      render();
    } else if (!g.drawing && Math.hypot(p[0] - g.start[0], p[1] - g.start[1]) > DRAG_START) {
      g.drawing = true; // freehand: sample the mouse at a steady rate until the button is released
      g.timer = setInterval(() => { editor.tracks[g.track].points.push(editor.mouse.slice()); render(); },
                            editor.intervalMs);
    }
  }

  function onUp() {
    const g = editor.gesture;
    if (!g) return;
    if (g.timer) {
      clearInterval(g.timer);
      const points = editor.tracks[g.track].points; // end exactly where the button was released
      const last = points[points.length - 1];
      if (last[0] !== editor.mouse[0] || last[1] !== editor.mouse[1]) points.push(editor.mouse.slice());
    }
    editor.gesture = null;
    render();
  }

  function onDoubleClick(event) {
    const hit = nearestPoint(eventPoint(event));
    if (!hit) return;
    snapshot();
    const track = editor.tracks[hit.track];
    track.points.splice(hit.index, 1);
    if (track.points.length === 0) {
      editor.tracks.splice(hit.track, 1);
      editor.selected = -1;
    }
    render();
  }

  // -- drawing -----------------------------------------------------------------------------------
  function render() {
    if (!editor.canvas) return;
    const ctx = editor.canvas.getContext("2d");
    ctx.clearRect(0, 0, editor.width, editor.height);
    if (editor.background && editor.background.complete) {
      ctx.drawImage(editor.background, 0, 0, editor.width, editor.height);
    } else {
      ctx.fillStyle = "#808080";
      ctx.fillRect(0, 0, editor.width, editor.height);
    }
    editor.tracks.forEach((track, t) => drawTrack(ctx, track, colour(t), t === editor.selected));
    if (editor.animation) {
      editor.animation.forEach((frames, t) => {
        const p = frames[editor.frame % frames.length];
        ctx.fillStyle = "#a0e664";
        ctx.strokeStyle = "#000";
        ctx.beginPath(); ctx.arc(p[0], p[1], 6, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
      });
    }
    updateLabel();
  }

  function drawTrack(ctx, track, stroke, selected) {
    const pts = track.points;
    ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeStyle = stroke;
    ctx.fillStyle = stroke;
    if (pts.length > 1) {
      ctx.beginPath();
      ctx.moveTo(pts[0][0], pts[0][1]);
      pts.slice(1).forEach((p) => ctx.lineTo(p[0], p[1]));
      ctx.stroke();
    }
    pts.forEach((p, i) => {
      const r = selected ? 4 : 3;
      if (track.static) {
        ctx.fillRect(p[0] - r - 1, p[1] - r - 1, 2 * r + 2, 2 * r + 2);
      } else {
        ctx.beginPath(); ctx.arc(p[0], p[1], i === 0 ? r + 2 : r, 0, 2 * Math.PI); ctx.fill();
      }
    });
    if (pts.length > 1) { // an arrow head at the end shows the direction
      const [a, b] = [pts[pts.length - 2], pts[pts.length - 1]];
      const angle = Math.atan2(b[1] - a[1], b[0] - a[0]);
      ctx.beginPath();
      ctx.moveTo(b[0], b[1]);
      ctx.lineTo(b[0] - 10 * Math.cos(angle - 0.4), b[1] - 10 * Math.sin(angle - 0.4));
      ctx.lineTo(b[0] - 10 * Math.cos(angle + 0.4), b[1] - 10 * Math.sin(angle + 0.4));
      ctx.closePath(); ctx.fill();
    }
  }

  function updateLabel() {
    const label = editor.root && editor.root.querySelector(".tora-label");
    if (!label) return;
    const track = editor.tracks[editor.selected];
    const what = track ? `track ${editor.selected + 1} selected (${track.points.length} point(s)${track.static ? ", static" : ""})`
                       : "no track selected: a click starts a new one";
    label.textContent = `${editor.tracks.length} track(s); ${what}` + (editor.mode === "static" ? "; click to place a static point" : "");
  }

  setInterval(() => { if (editor.animation) { editor.frame += 1; render(); } }, 125); // preview at 8 fps

  // -- Python <-> editor ----------------------------------------------------------------------------
  function load(text) {
    if (!editor.canvas) { editor.pending = text; return; }
    const data = typeof text === "string" ? JSON.parse(text) : text;
    if (data.width && data.height && (data.width !== editor.width || data.height !== editor.height)) {
      editor.width = data.width; editor.height = data.height;
      editor.canvas.width = data.width; editor.canvas.height = data.height;
    }
    if (data.colours) editor.colours = data.colours;
    if (data.freehand_interval_ms) editor.intervalMs = data.freehand_interval_ms;
    if (data.background) {
      const image = new Image();
      image.onload = render;
      image.src = data.background;
      editor.background = image;
    }
    const incoming = (data.tracks || []).map((t) => ({ points: t.points, static: !!t.static }));
    if (data.replace) {
      editor.tracks = incoming;
    } else if (incoming.length) {
      snapshot();
      editor.tracks = editor.tracks.concat(incoming);
    }
    if (editor.selected >= editor.tracks.length) editor.selected = -1;
    editor.animation = data.animation || null;
    editor.frame = 0;
    render();
  }

  function serialize() {
    return JSON.stringify({
      editor_size: [editor.width, editor.height],
      tracks: editor.tracks.map((t) => ({ points: t.points.map((p) => [p[0], p[1]]), static: t.static })),
    });
  }

  // -- mounting ------------------------------------------------------------------------------------
  function button(label, title, action) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.className = "tora-tool";
    b.style.margin = "0 6px 6px 0";
    b.addEventListener("click", () => { action(); render(); });
    return b;
  }

  function mount(root) {
    editor.root = root;
    root.innerHTML = "";
    const bar = document.createElement("div");
    bar.append(
      button("New track", "the next click starts another object's track", () => { editor.selected = -1; editor.mode = "draw"; }),
      button("Static point", "the next click places an object that stays put", () => { editor.mode = "static"; }),
      button("Undo", "undo the last change", undo),
      button("Delete track", "delete the selected track", () => {
        if (editor.selected < 0) return;
        snapshot(); editor.tracks.splice(editor.selected, 1); editor.selected = -1;
      }),
      button("Clear", "delete every track", () => { snapshot(); editor.tracks = []; editor.selected = -1; }));
    const label = document.createElement("div");
    label.className = "tora-label";
    label.style.margin = "0 0 6px 0";
    const canvas = document.createElement("canvas");
    canvas.width = editor.width;
    canvas.height = editor.height;
    canvas.id = "tora-canvas";
    canvas.addEventListener("mousedown", onDown);
    canvas.addEventListener("dblclick", onDoubleClick);
    window.addEventListener("mousemove", onMove);
    window.addEventListener("mouseup", onUp);
    root.append(bar, label, canvas);
    editor.canvas = canvas;
    if (editor.pending) { const p = editor.pending; editor.pending = null; load(p); }
    render();
  }

  // Gradio renders the page after this script runs: mount when the root element appears (and again
  // if Gradio ever replaces it).
  setInterval(() => {
    const root = document.getElementById("tora-editor-root");
    if (root && root !== editor.root) mount(root);
  }, 200);

  window.toraEditor = { load: load, serialize: serialize, state: editor };
})();
