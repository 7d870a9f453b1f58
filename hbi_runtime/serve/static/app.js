// The search page of `hbi-run serve` (docs/serve.md, "Search page"): plain JavaScript, no framework, no build step,
// nothing loaded from elsewhere. Every string that comes from the server (file names, queries, answers, captions)
// reaches the page through textContent or an attribute, never as HTML: a file name can hold anything.
"use strict";

(() => {
  const KEY_STORE = "hbi.apiKey"; // sessionStorage only: gone when the tab closes
  const QA_TOP_K = 5;
  const THUMB_CONCURRENCY = 4; // thumbnails are extracted on demand: do not ask for all of them at once
  const LEVEL_TITLES = {
    entity: "Entity level: words and single frames",
    action: "Action level: groups of words and groups of frames (the model's merged tokens)",
    event: "Event level: the largest groups (the model's second merge)",
  };

  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"), query: $("query"), topK: $("top-k"), searchButton: $("search-button"),
    key: $("api-key"), keyForget: $("key-forget"), keyBox: $("key-box"),
    layout: $("layout"), status: $("status"), searchError: $("search-error"), results: $("results"),
    detail: $("detail"), detailTitle: $("detail-title"), detailPath: $("detail-path"), detailClose: $("detail-close"),
    player: $("player"), detailMeta: $("detail-meta"), playerError: $("player-error"),
    whyWords: $("why-words"), explainButton: $("explain-button"), explainError: $("explain-error"),
    explainOut: $("explain-out"),
    qaForm: $("qa-form"), qaQuestion: $("qa-question"), qaButton: $("qa-button"), qaError: $("qa-error"),
    qaAnswers: $("qa-answers"),
    captionButton: $("caption-button"), captionError: $("caption-error"), captionText: $("caption-text"),
  };

  const state = {
    query: "", // the query as the server read it (the one the hits and the "why" belong to)
    hits: [],
    selected: -1,
    generation: 0, // bumped by every search and every selection: late answers for an older one are dropped
    blobUrls: [], // object URLs made for this result list (revoked by the next search)
  };

  // ------------------------------------------------------------------------------------------------ helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clock(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
    const tenths = Math.round(seconds * 10);
    const m = Math.floor(tenths / 600);
    const s = (tenths - m * 600) / 10;
    return `${m}:${s.toFixed(1).padStart(4, "0")}`;
  }

  function signed(value, digits) {
    const text = Number(value).toFixed(digits);
    return value >= 0 && !text.startsWith("-") ? `+${text}` : text;
  }

  function baseName(path) {
    const parts = String(path).split("/");
    return parts[parts.length - 1] || String(path);
  }

  function folderOf(path) {
    const parts = String(path).split("/");
    return parts.length > 1 ? parts.slice(0, -1).join("/") + "/" : "";
  }

  function videoUrl(videoId, what) {
    return `/v1/videos/${encodeURIComponent(videoId)}/${what}`;
  }

  function thumbUrl(videoId, seconds) {
    const t = typeof seconds === "number" && Number.isFinite(seconds) ? seconds : 0;
    return `${videoUrl(videoId, "thumbnail")}?t=${encodeURIComponent(t.toFixed(3))}`;
  }

  function timeRange(hit) {
    const range = `${clock(hit.start_s)}–${clock(hit.end_s)}`;
    const whole = typeof hit.duration_s === "number" && hit.start_s <= 0.001 && hit.end_s >= hit.duration_s - 0.001;
    return whole || typeof hit.duration_s !== "number" ? range : `${range} of ${clock(hit.duration_s)}`;
  }

  // ------------------------------------------------------------------------------------------------ API key

  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch (e) {
      return els.key.value.trim(); // storage refused (privacy settings): the field still works for this page
    }
  }

  function storeKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* the field keeps it */ }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  // ------------------------------------------------------------------------------------------------ requests

  class ApiError extends Error {
    constructor(message, hint, type, status) {
      super(message);
      this.hint = hint || "";
      this.type = type || "";
      this.status = status || 0;
    }
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (e) { /* not JSON */ }
    const err = body && typeof body === "object" ? body.error : null;
    if (err && typeof err === "object" && err.message) {
      return new ApiError(String(err.message), err.hint ? String(err.hint) : "", String(err.type || ""),
                          response.status);
    }
    const hint = response.status === 401 || response.status === 403
      ? "this server needs an API key: type it under \u201cAPI key\u201d at the top" : "";
    return new ApiError(`the server answered ${response.status} ${response.statusText}`.trim(), hint, "http",
                        response.status);
  }

  async function request(path, options) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (e) {
      throw new ApiError("the server cannot be reached", "is hbi-run serve still running?", "network", 0);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function postJson(path, body) {
    const response = await request(path, {
      method: "POST",
      headers: authHeaders({"Content-Type": "application/json", Accept: "application/json"}),
      body: JSON.stringify(body),
    });
    return response.json();
  }

  // An object URL for a resource that needs the Authorization header (an <img> or <video> cannot send one).
  async function blobUrl(path) {
    const response = await request(path, {headers: authHeaders()});
    const url = URL.createObjectURL(await response.blob());
    state.blobUrls.push(url);
    return url;
  }

  function showError(box, err) {
    box.replaceChildren(el("p", "message", err.message || String(err)));
    if (err.hint) box.append(el("p", "hint", `Hint: ${err.hint}`));
    box.hidden = false;
    if (err.status === 401 || err.status === 403) els.keyBox.open = true;
  }

  function clearError(box) {
    box.hidden = true;
    box.replaceChildren();
  }

  // Thumbnails: a few at a time; with an API key through fetch (the header), else the browser's own loading.
  const thumbQueue = [];
  let thumbsRunning = 0;

  function loadImage(img, path) {
    img.addEventListener("load", () => {
      if (img.naturalWidth && img.naturalWidth < img.clientWidth) img.classList.add("pixelated");
      img.closest(".thumb")?.classList.remove("loading");
    }, {once: true});
    img.addEventListener("error", () => {
      const box = img.closest(".thumb");
      if (box) {
        box.classList.remove("loading");
        box.classList.add("missing");
      }
    }, {once: true});
    thumbQueue.push({img, path});
    pumpThumbs();
  }

  function pumpThumbs() {
    while (thumbsRunning < THUMB_CONCURRENCY && thumbQueue.length) {
      const job = thumbQueue.shift();
      thumbsRunning += 1;
      const done = () => {
        thumbsRunning -= 1;
        pumpThumbs();
      };
      if (apiKey()) {
        blobUrl(job.path).then((url) => { job.img.src = url; }, () => job.img.dispatchEvent(new Event("error")))
          .finally(done);
      } else {
        job.img.addEventListener("load", done, {once: true});
        job.img.addEventListener("error", done, {once: true});
        job.img.src = job.path;
      }
    }
  }

  // ------------------------------------------------------------------------------------------------ search

  async function search(event) {
    if (event) event.preventDefault();
    const query = els.query.value.trim();
    clearError(els.searchError);
    if (!query) {
      showError(els.searchError, new ApiError("type a query first", "describe what happens, e.g. \u201ca red circle "
                                              + "turns green\u201d"));
      els.query.focus();
      return;
    }
    const topK = Math.min(100, Math.max(1, parseInt(els.topK.value, 10) || 12));
    els.topK.value = String(topK);
    const generation = ++state.generation;
    document.body.dataset.state = "searching";
    els.results.setAttribute("aria-busy", "true");
    els.searchButton.disabled = true;
    els.status.textContent = "Searching\u2026";
    const started = performance.now();
    try {
      const doc = await postJson("/v1/retrieve", {queries: [query], top_k: topK, explain: false});
      if (generation !== state.generation) return;
      const result = (doc.queries || [])[0] || {query, truncated: false, hits: []};
      state.query = result.query;
      showResults(result, (performance.now() - started) / 1000);
      document.body.dataset.state = "results";
      try {
        history.replaceState(null, "", `#q=${encodeURIComponent(query)}`);
      } catch (e) { /* a file:// page or a sandbox */ }
    } catch (err) {
      if (generation !== state.generation) return;
      els.status.textContent = "";
      showError(els.searchError, err);
      document.body.dataset.state = "error";
    } finally {
      if (generation === state.generation) {
        els.results.removeAttribute("aria-busy");
        els.searchButton.disabled = false;
      }
    }
  }

  function showResults(result, seconds) {
    closeDetail(false);
    for (const url of state.blobUrls) URL.revokeObjectURL(url);
    state.blobUrls = [];
    thumbQueue.length = 0;
    state.hits = result.hits || [];
    state.selected = -1;
    const n = state.hits.length;
    let text = n ? `${n} ${n === 1 ? "video" : "videos"}, best first (${seconds.toFixed(2)} s).`
      : "No video matched: is the folder indexed?";
    if (result.truncated) text += " The query was longer than the model reads and was cut.";
    els.status.textContent = text;
    els.results.replaceChildren(...state.hits.map(card));
  }

  function card(hit, i) {
    const item = el("li");
    const button = el("button", "card");
    button.type = "button";
    button.dataset.rank = String(hit.rank);
    button.dataset.videoId = String(hit.video_id);
    const thumb = el("span", "thumb loading");
    const img = el("img");
    img.alt = `frame at ${clock(hit.best_frame_s)}`;
    img.decoding = "async";
    thumb.append(img, el("span", "rank", `#${hit.rank}`));
    const name = el("span", "name", baseName(hit.path));
    const folder = folderOf(hit.path);
    const meta = el("span", "meta");
    meta.append(el("span", "score", `score ${Number(hit.score).toFixed(4)}`), el("span", "range", timeRange(hit)));
    button.append(thumb, name);
    if (folder) button.append(el("span", "folder", folder));
    button.append(meta);
    button.title = String(hit.path);
    button.addEventListener("click", () => select(i));
    item.append(button);
    loadImage(img, thumbUrl(hit.video_id, hit.best_frame_s));
    return item;
  }

  // ------------------------------------------------------------------------------------------------ detail

  function select(i) {
    const hit = state.hits[i];
    if (!hit) return;
    state.selected = i;
    const generation = ++state.generation;
    for (const button of els.results.querySelectorAll(".card")) button.removeAttribute("aria-current");
    els.results.querySelectorAll(".card")[i]?.setAttribute("aria-current", "true");

    els.detail.hidden = false;
    els.layout.classList.add("has-detail");
    els.detailTitle.textContent = baseName(hit.path);
    els.detailPath.textContent = String(hit.path);
    els.detailMeta.replaceChildren(
      el("span", "", `#${hit.rank}`), el("span", "", `score ${Number(hit.score).toFixed(4)}`),
      el("span", "", timeRange(hit)), el("span", "", `best-matching moment ${clock(hit.best_frame_s)}`));
    for (const box of [els.playerError, els.explainError, els.qaError, els.captionError]) clearError(box);
    els.explainOut.replaceChildren();
    els.qaAnswers.replaceChildren();
    els.captionText.textContent = "";
    els.explainButton.disabled = false;
    showWords(hit);
    if (hit.explanation) showExplanation({levels: [hit.explanation]}, hit);
    play(hit, generation);
    if (window.matchMedia("(max-width: 899px)").matches) els.detail.scrollIntoView({block: "start"});
  }

  function closeDetail(restoreFocus) {
    const i = state.selected;
    els.player.pause();
    els.player.removeAttribute("src");
    els.player.load();
    els.detail.hidden = true;
    els.layout.classList.remove("has-detail");
    state.selected = -1;
    state.generation += 1;
    const cards = els.results.querySelectorAll(".card");
    for (const button of cards) button.removeAttribute("aria-current");
    if (restoreFocus && cards[i]) cards[i].focus();
  }

  async function play(hit, generation) {
    const player = els.player;
    const start = typeof hit.best_frame_s === "number" ? hit.best_frame_s : (hit.start_s || 0);
    player.dataset.start = String(start);
    player.onloadedmetadata = () => {
      if (player.videoWidth && player.videoWidth < player.clientWidth) player.classList.add("pixelated");
      else player.classList.remove("pixelated");
      if (Math.abs(player.currentTime - start) > 0.05) player.currentTime = start;
      player.play().catch(() => { /* autoplay refused: the controls are there */ });
    };
    player.onerror = () => {
      if (generation !== state.generation) return;
      showError(els.playerError, new ApiError("this browser cannot play the video",
                                              "its codec may not be supported here; the file itself is fine to "
                                              + "search"));
    };
    let src = videoUrl(hit.video_id, "media");
    if (apiKey()) {
      // <video> cannot send an Authorization header: fetch the file (whole) with it and play the copy.
      try {
        src = await blobUrl(src);
      } catch (err) {
        if (generation === state.generation) showError(els.playerError, err);
        return;
      }
      if (generation !== state.generation) return;
    }
    player.src = `${src}#t=${start.toFixed(3)}`;
  }

  function seek(seconds) {
    if (typeof seconds !== "number") return;
    els.player.currentTime = seconds;
    els.player.play().catch(() => {});
  }

  // The words of the query, each with the moment it matches best, on a time line of the hit.
  function showWords(hit) {
    const words = hit.words || [];
    const from = typeof hit.start_s === "number" ? hit.start_s : 0;
    const to = typeof hit.end_s === "number" && hit.end_s > from ? hit.end_s : from + 1;
    const items = [];
    const row = (label, seconds, className) => {
      const li = el("li");
      const button = el("button", `word-row ${className}`);
      button.type = "button";
      const track = el("span", "track");
      if (typeof seconds === "number") {
        const dot = el("span", "dot");
        dot.style.left = `${Math.min(100, Math.max(0, (100 * (seconds - from)) / (to - from)))}%`;
        track.append(dot);
        button.addEventListener("click", () => seek(seconds));
        button.setAttribute("aria-label", `${label}: best at ${clock(seconds)}; play from there`);
      } else {
        button.disabled = true;
      }
      button.append(el("span", "word", label), track, el("span", "time", clock(seconds)));
      li.append(button);
      items.push(li);
    };
    row("best-matching moment", hit.best_frame_s, "best");
    for (const w of words) row(String(w.word), w.time_s, "");
    els.whyWords.replaceChildren(...items);
  }

  // ------------------------------------------------------------------------------------------------ explain

  async function explain() {
    const hit = state.hits[state.selected];
    if (!hit) return;
    const generation = state.generation;
    clearError(els.explainError);
    els.explainButton.disabled = true;
    els.explainOut.replaceChildren(el("p", "note", "Computing the interaction map\u2026"));
    try {
      const doc = await postJson("/v1/explain", {query: state.query, video_id: hit.video_id});
      if (generation !== state.generation) return;
      showExplanation(doc, hit);
    } catch (err) {
      if (generation !== state.generation) return;
      els.explainOut.replaceChildren();
      showError(els.explainError, err);
      els.explainButton.disabled = false;
    }
  }

  function colour(value, vmax) {
    const x = vmax > 0 ? Math.max(-1, Math.min(1, value / vmax)) : 0;
    if (x >= 0) return `rgb(255,${Math.round(255 - 180 * x)},${Math.round(255 - 200 * x)})`;
    return `rgb(${Math.round(255 + 200 * x)},${Math.round(255 + 140 * x)},255)`;
  }

  function showExplanation(doc, hit) {
    const out = [];
    const intro = el("p", "note");
    intro.append(
      "Each cell asks, for one word and one moment: ", el("b", "", "do they work together?"),
      " The number is the Banzhaf interaction: how much more the pair adds to the score when both are there than "
      + "the two add separately, averaged over every combination of the other words and moments. ",
      el("span", "red", "Red"), ": they cooperate (the word finds what it describes in that moment). ",
      el("span", "blue", "Blue"), ": they compete (the word is already matched elsewhere). White: no link. Faded "
      + "numbers are within two standard errors of zero. The italic \u201calone\u201d row and column are each "
      + "word's and each moment's own contribution: read that row to find the moments the match rests on.");
    out.push(intro);
    for (const level of doc.levels || []) {
      const body = levelTable(level, hit);
      if (level.level === "entity" || (doc.levels || []).length === 1) {
        out.push(el("h4", "", LEVEL_TITLES[level.level] || String(level.level)), ...body);
      } else {
        const details = el("details", "level");
        details.append(el("summary", "", LEVEL_TITLES[level.level] || String(level.level)), ...body);
        out.push(details);
      }
    }
    els.explainOut.replaceChildren(...out);
    els.explainButton.disabled = true;
  }

  function levelTable(level, hit) {
    const est = level.estimator || {};
    const vmax = Number(est.max_abs_interaction) || 0;
    const how = est.method === "exact" ? "every combination counted (exact)"
      : `estimated from ${est.samples} random combinations (seed ${est.seed})`;
    const note = el("p", "note");
    note.append("Score at this level: ", el("b", "", Number(level.score).toFixed(4)), `. Interactions ${how}`);
    if (typeof est.median_stderr_ratio === "number") {
      note.append(`; the median standard error is ${(100 * est.median_stderr_ratio).toFixed(1)} % of the largest `
                  + `interaction (${vmax.toFixed(4)})`);
    }
    note.append(".");
    const parts = [note];
    if (level.level !== "entity" && level.clusters_known === false) {
      parts.push(el("p", "note", "This model package does not record which words and frames each group merged, "
                    + "so the groups are shown by number only."));
    }
    const rows = level.rows || [];
    const cols = level.cols || [];
    const values = level.interaction || [];
    const errs = level.stderr || [];
    const rowValues = level.row_values || null;
    const colValues = level.col_values || null;
    const all = [...(rowValues || []), ...(colValues || [])].map((v) => Math.abs(v));
    const vmaxValue = Math.max(1e-9, ...all);

    const table = el("table", "map");
    const caption = el("caption", "visually-hidden", `Interaction of each query word (rows) with each moment `
                       + `(columns), ${level.level} level`);
    table.append(caption);
    const head = el("tr");
    head.append(el("th"));
    for (const c of cols) {
      const th = el("th");
      th.scope = "col";
      const times = c.kind === "frame" ? [c.time_s] : (c.times_s || []);
      for (const t of times.slice(0, 3)) {
        const img = el("img", "frame");
        img.alt = `frame at ${clock(t)}`;
        img.width = 40;
        img.height = 40;
        loadImage(img, thumbUrl(hit.video_id, t));
        th.append(img);
      }
      const label = c.kind === "cluster" ? String(c.label).split(":")[0] : String(c.label);
      th.append(el("span", "col-label", label));
      if (c.kind === "cluster" && Array.isArray(c.spans_s) && c.spans_s.length) {
        th.append(el("span", "span", c.spans_s.map(([a, b]) => (a === b ? clock(a) : `${clock(a)}–${clock(b)}`))
          .join(", ")));
      }
      if (typeof c.time_s === "number") {
        th.title = "play from here";
        th.classList.add("seekable");
        th.addEventListener("click", () => seek(c.time_s));
      }
      head.append(th);
    }
    const aloneHead = el("th", "value", "alone");
    aloneHead.title = "what the word adds to the score on its own, on average";
    head.append(aloneHead);
    table.append(head);

    rows.forEach((r, i) => {
      const tr = el("tr");
      const th = el("th", "row", r.label);
      th.scope = "row";
      tr.append(th);
      cols.forEach((c, j) => {
        const v = Number((values[i] || [])[j]);
        const se = Number((errs[i] || [])[j]) || 0;
        const td = el("td", Math.abs(v) <= 2 * se ? "weak" : "", signed(v, 3));
        td.style.background = colour(v, vmax);
        td.title = `${r.label} \u00d7 ${c.label}: ${signed(v, 5)} \u00b1 ${se.toFixed(5)}`;
        tr.append(td);
      });
      tr.append(valueCell(rowValues, level.row_values_stderr, i, r.label, vmaxValue));
      table.append(tr);
    });
    const last = el("tr");
    const aloneRow = el("th", "row value", "alone");
    aloneRow.scope = "row";
    aloneRow.title = "what the moment adds to the score on its own, on average";
    last.append(aloneRow);
    cols.forEach((c, j) => last.append(valueCell(colValues, level.col_values_stderr, j, c.label, vmaxValue)));
    last.append(el("td"));
    table.append(last);

    const scroller = el("div", "map-scroll");
    scroller.append(table);
    const legend = el("p", "legend note");
    const swatch = (background) => {
      const s = el("span", "swatch");
      s.style.background = background;
      return s;
    };
    legend.append(swatch(colour(-vmax, vmax)), ` ${signed(-vmax, 3)} `, swatch("#fff"), " 0 ",
                  swatch(colour(vmax, vmax)), ` ${signed(vmax, 3)}`);
    parts.push(scroller, legend);
    return parts;
  }

  function valueCell(values, errs, k, label, vmax) {
    if (!values) return el("td");
    const v = Number(values[k]);
    const se = Number((errs || [])[k]) || 0;
    const td = el("td", "value", signed(v, 3));
    td.style.background = colour(v, vmax);
    td.title = `${label} alone: ${signed(v, 5)} \u00b1 ${se.toFixed(5)}`;
    return td;
  }

  // ------------------------------------------------------------------------------------------------ QA, caption

  function firstResult(doc) {
    const result = (doc.results || [])[0];
    if (!result) throw new ApiError("the server gave no result", "");
    if (result.error) {
      const e = typeof result.error === "object" ? result.error : {message: String(result.error)};
      throw new ApiError(String(e.message || "the video could not be read"), e.hint ? String(e.hint) : "");
    }
    return result;
  }

  async function ask(event) {
    event.preventDefault();
    const hit = state.hits[state.selected];
    if (!hit) return;
    const question = els.qaQuestion.value.trim();
    clearError(els.qaError);
    if (!question) {
      showError(els.qaError, new ApiError("type a question first", "e.g. \u201cwhat colour is the circle?\u201d"));
      return;
    }
    const generation = state.generation;
    els.qaButton.disabled = true;
    els.qaAnswers.replaceChildren(el("li", "note", "Thinking\u2026"));
    try {
      const doc = await postJson("/v1/qa", {video_id: hit.video_id, question, top_k: QA_TOP_K});
      if (generation !== state.generation) return;
      const answers = firstResult(doc).answers || [];
      els.qaAnswers.replaceChildren(...answers.map((a) => {
        const li = el("li");
        const p = Math.max(0, Math.min(1, Number(a.probability) || 0));
        const bar = el("span", "bar");
        bar.style.width = `${(100 * p).toFixed(1)}%`;
        const track = el("span", "bar-track");
        track.append(bar);
        li.append(el("span", "answer", a.answer), track, el("span", "prob", `${(100 * p).toFixed(1)} %`));
        return li;
      }));
    } catch (err) {
      if (generation !== state.generation) return;
      els.qaAnswers.replaceChildren();
      showError(els.qaError, err);
    } finally {
      els.qaButton.disabled = false;
    }
  }

  async function caption() {
    const hit = state.hits[state.selected];
    if (!hit) return;
    const generation = state.generation;
    clearError(els.captionError);
    els.captionButton.disabled = true;
    els.captionText.textContent = "Writing a caption\u2026";
    try {
      const doc = await postJson("/v1/caption", {video_id: hit.video_id, question: null});
      if (generation !== state.generation) return;
      els.captionText.textContent = `\u201c${firstResult(doc).text}\u201d`;
    } catch (err) {
      if (generation !== state.generation) return;
      els.captionText.textContent = "";
      showError(els.captionError, err);
    } finally {
      els.captionButton.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------------ wiring

  els.form.addEventListener("submit", search);
  els.results.addEventListener("keydown", (event) => {
    // arrow keys move between result cards (Tab works too)
    const cards = [...els.results.querySelectorAll(".card")];
    const i = cards.indexOf(document.activeElement);
    if (i < 0) return;
    const step = {ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1}[event.key];
    if (!step) return;
    event.preventDefault();
    cards[Math.max(0, Math.min(cards.length - 1, i + step))].focus();
  });
  els.detailClose.addEventListener("click", () => closeDetail(true));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !els.detail.hidden) closeDetail(true);
  });
  els.explainButton.addEventListener("click", explain);
  els.qaForm.addEventListener("submit", ask);
  els.captionButton.addEventListener("click", caption);
  els.key.value = apiKey();
  els.key.addEventListener("input", () => storeKey(els.key.value.trim()));
  els.keyForget.addEventListener("click", () => {
    els.key.value = "";
    storeKey("");
  });
  document.body.dataset.state = "idle";

  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("q");
  if (fromUrl) {
    els.query.value = fromUrl;
    search(null);
  }
})();
