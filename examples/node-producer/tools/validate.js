#!/usr/bin/env node
// node tools/validate.js SCHEMA.json COMMANDS.jsonl → one line per command: true or false.
// ajv in strict mode (draft 2020-12, ECMA-262 regular expressions): compiling the schema
// fails on any keyword or construct that is not standard, which is the point.
import { readFileSync } from "node:fs";
import Ajv2020 from "ajv/dist/2020.js";

const [schemaPath, commandsPath] = process.argv.slice(2);
const ajv = new Ajv2020({ strict: true, allErrors: false });
const validate = ajv.compile(JSON.parse(readFileSync(schemaPath, "utf8")));
const lines = readFileSync(commandsPath, "utf8").split("\n").filter((line) => line.trim());
for (const line of lines) {
  console.log(validate(JSON.parse(line)) ? "true" : "false");
}
