// The API page of `hbi-run serve`: the routes of /openapi.json as plain HTML (no framework, nothing fetched from
// elsewhere). Every string from the document reaches the page through textContent.
"use strict";

(() => {
  const out = document.getElementById("api");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function resolve(doc, schema) {
    if (schema && schema.$ref) return doc.components.schemas[schema.$ref.split("/").pop()] || {};
    return schema || {};
  }

  function typeOf(doc, schema) {
    schema = resolve(doc, schema);
    if (schema.anyOf) return schema.anyOf.map((s) => typeOf(doc, s)).join(" | ");
    if (schema.type === "array") return `${typeOf(doc, schema.items)}[]`;
    return schema.type || "object";
  }

  function fields(doc, schema) {
    schema = resolve(doc, schema);
    const table = el("table", "fields");
    const required = new Set(schema.required || []);
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      const tr = el("tr");
      const p = resolve(doc, prop);
      const dflt = "default" in p ? ` (default ${JSON.stringify(p.default)})` : "";
      tr.append(el("td", "name", name + (required.has(name) ? " *" : "")), el("td", "type", typeOf(doc, prop)),
                el("td", "desc", (p.description || p.title || "") + dflt));
      table.append(tr);
    }
    return table;
  }

  function route(doc, path, method, op) {
    const box = el("section", "route");
    box.append(el("h2", "", `${method.toUpperCase()} ${path}`));
    if (op.summary) box.append(el("p", "", op.summary));
    const params = op.parameters || [];
    if (params.length) {
      box.append(el("h3", "", "Parameters"));
      const table = el("table", "fields");
      for (const p of params) {
        const tr = el("tr");
        tr.append(el("td", "name", p.name + (p.required ? " *" : "")), el("td", "type", `${p.in}: ${typeOf(doc, p.schema)}`),
                  el("td", "desc", p.description || ""));
        table.append(tr);
      }
      box.append(table);
    }
    const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
    if (body) {
      box.append(el("h3", "", "JSON body (* required)"), fields(doc, body.schema));
    }
    return box;
  }

  fetch("/openapi.json").then((r) => {
    if (!r.ok) throw new Error(`the server answered ${r.status}`);
    return r.json();
  }).then((doc) => {
    const items = [el("p", "note", doc.info && doc.info.description ? doc.info.description : "")];
    for (const [path, ops] of Object.entries(doc.paths || {})) {
      for (const [method, op] of Object.entries(ops)) items.push(route(doc, path, method, op));
    }
    out.replaceChildren(...items);
  }).catch((e) => {
    out.replaceChildren(el("p", "error", `cannot read /openapi.json: ${e.message} (with an API key, read it with curl -H 'Authorization: Bearer KEY')`));
  });
})();
