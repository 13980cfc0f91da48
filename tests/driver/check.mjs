// The Neon serverless driver (the version package.json pins) against
// pgfleet's POST /sql, with node-postgres over TCP as the reference: every
// value must come back as the same JavaScript value both ways.
//
// Environment: SQL_ENDPOINT (http://host:port/sql), RW_URL and RO_URL (the
// project's connection strings), CA_FILE (the fleet CA, for node-postgres's
// TLS). Exits 0 and prints "ok <n>" when every check passed; otherwise
// prints what differed and exits 1.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { neon, neonConfig, NeonDbError } from "@neondatabase/serverless";
import pg from "pg";

neonConfig.fetchEndpoint = process.env.SQL_ENDPOINT;
const rwUrl = process.env.RW_URL;
const roUrl = process.env.RO_URL;
const sql = neon(rwUrl);

const direct = new pg.Client({
  connectionString: rwUrl.split("?")[0],
  ssl: { ca: readFileSync(process.env.CA_FILE, "utf8"), rejectUnauthorized: true },
});
await direct.connect();

let checks = 0;
async function check(name, fn) {
  try {
    await fn();
    checks += 1;
  } catch (e) {
    console.error(`FAILED ${name}:`, e);
    process.exitCode = 1;
  }
}

// Values compared as data: a Buffer from the driver's bundle and one from
// Node are different classes holding the same bytes.
function norm(v) {
  if (v === null || v === undefined) return v;
  if (v instanceof Date) return { date: Number.isNaN(v.getTime()) ? "invalid" : v.toISOString() };
  if (ArrayBuffer.isView(v)) return { bytes: Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("hex") };
  if (Array.isArray(v)) return v.map(norm);
  if (typeof v === "object") {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)]).concat([["$class", v.constructor?.name === "Object" ? "Object" : "instance"]]));
  }
  return v;
}

async function rejects(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  throw new Error("expected an error");
}

await check("tagged template with parameters", async () => {
  const rows = await sql`SELECT ${20}::int + ${22}::int AS answer, ${"it's"} AS quoted`;
  assert.deepEqual(rows, [{ answer: 42, quoted: "it's" }]);
});

await check("every type the SQL API supports round-trips as node-postgres returns it", async () => {
  const query = `SELECT
      1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8, 1.5::float4 AS f4,
      'NaN'::float8 AS f8nan, 'Infinity'::float8 AS f8inf, 12345678901234567890.123::numeric AS num,
      true AS b, 'text ✓'::text AS t, 'v'::varchar(3) AS vc, 'c'::char(3) AS ch,
      '\\x00ff10'::bytea AS by, '{"a": [1, 2, {"b": null}]}'::json AS js,
      '{"k": "v", "n": 1.5}'::jsonb AS jb, '2024-02-29'::date AS d,
      '2024-02-29 13:14:15.123456'::timestamp AS ts,
      '2024-02-29 13:14:15.123456+05:30'::timestamptz AS tstz,
      'infinity'::timestamptz AS tsinf, '13:14:15'::time AS tm, '13:14:15+02'::timetz AS tmtz,
      '1 year 2 mons 3 days 04:05:06.5'::interval AS iv,
      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '192.168.0.1/24'::inet AS ip,
      '10.0.0.0/8'::cidr AS net, '08:00:2b:01:02:03'::macaddr AS mac, '(1.5,2)'::point AS pt,
      '{1,NULL,3}'::int4[] AS ia, '{"a b","c\\"d",NULL}'::text[] AS ta, '{t,f}'::bool[] AS ba,
      '{1.5,2}'::numeric[] AS na, ARRAY['{"x":1}'::jsonb] AS ja, '{10,20}'::int8[] AS i8a,
      ARRAY['2024-01-01'::date] AS da, '[1,5)'::int4range AS r, 'b'::"char" AS qc,
      NULL::int AS nul, 'pg_class'::regclass AS rc, 42::oid AS o, 2.5::money AS m,
      '<(1,2),3>'::circle AS ci, 'foo'::name AS nm`;
  const viaDriver = await sql.query(query);
  const viaPg = (await direct.query(query)).rows;
  assert.equal(viaDriver.length, 1);
  assert.deepStrictEqual(norm(viaDriver), norm(viaPg));
  assert.equal(typeof viaDriver[0].i4, "number");
  assert.equal(viaDriver[0].i8, "9007199254740993");
  assert.ok(viaDriver[0].tstz instanceof Date);
  assert.deepEqual(viaDriver[0].jb, { k: "v", n: 1.5 });
  assert.equal(Buffer.from(viaDriver[0].by).toString("hex"), "00ff10");
});

await check("parameters of every JavaScript kind round-trip as through node-postgres", async () => {
  const when = new Date(Date.UTC(2024, 1, 29, 13, 14, 15, 123));
  const bytes = Buffer.from([0, 1, 254, 255]);
  const params = [when, bytes, [1, 2, 3], ["a", "b c", null], { k: [1, { x: "y" }] }, 7n, true, null, 1.25];
  const query =
    "SELECT $1::timestamptz AS d, $2::bytea AS b, $3::int[] AS ia, $4::text[] AS ta, " +
    "$5::jsonb AS j, $6::int8 AS big, $7::bool AS flag, $8::text AS nothing, $9::float8 AS f";
  const viaDriver = await sql.query(query, params);
  const viaPg = (await direct.query(query, params)).rows;
  assert.deepStrictEqual(norm(viaDriver), norm(viaPg));
  assert.equal(viaDriver[0].d.getTime(), when.getTime());
  const tagged = await sql`SELECT ${bytes} AS b`; // the driver adds ::bytea itself
  assert.equal(Buffer.from(tagged[0].b).toString("hex"), "0001feff");
});

await check("array mode and full results", async () => {
  const asArrays = neon(rwUrl, { arrayMode: true });
  assert.deepEqual(await asArrays`SELECT 1 AS a, 'x' AS b`, [[1, "x"]]);
  const full = neon(rwUrl, { fullResults: true });
  const res = await full`SELECT g AS n FROM generate_series(1, 3) g`;
  assert.equal(res.command, "SELECT");
  assert.equal(res.rowCount, 3);
  assert.deepEqual(res.rows, [{ n: 1 }, { n: 2 }, { n: 3 }]);
  assert.deepEqual(res.fields.map((f) => [f.name, f.dataTypeID]), [["n", 23]]);
  const write = await full`CREATE TABLE IF NOT EXISTS driver_items (id int PRIMARY KEY, name text)`;
  assert.equal(write.command, "CREATE");
});

await check("transaction() commits as a whole", async () => {
  await sql`DELETE FROM driver_items`;
  const [ins, count] = await sql.transaction(
    [sql`INSERT INTO driver_items VALUES (${1}, ${"one"}), (${2}, ${"two"})`, sql`SELECT count(*)::int AS n FROM driver_items`],
    { isolationLevel: "Serializable", readOnly: false, deferrable: false },
  );
  assert.deepEqual(ins, []);
  assert.deepEqual(count, [{ n: 2 }]);
  const fn = await sql.transaction((tx) => [tx`SELECT current_setting('transaction_isolation') AS iso`], {
    isolationLevel: "RepeatableRead",
    readOnly: true,
  });
  assert.deepEqual(fn, [[{ iso: "repeatable read" }]]);
});

await check("transaction() rolls back on an error, which carries PostgreSQL's fields", async () => {
  const err = await rejects(
    sql.transaction([sql`INSERT INTO driver_items VALUES (3, 'three')`, sql`INSERT INTO driver_items VALUES (1, 'again')`]),
  );
  assert.ok(err instanceof NeonDbError, String(err));
  assert.equal(err.code, "23505");
  assert.equal(err.constraint, "driver_items_pkey");
  assert.match(err.detail, /Key \(id\)=\(1\) already exists/);
  assert.deepEqual(await sql`SELECT id FROM driver_items ORDER BY id`, [{ id: 1 }, { id: 2 }]);
});

await check("a syntax error says where", async () => {
  const err = await rejects(sql.query("SELECT 1 FROM WHERE"));
  assert.ok(err instanceof NeonDbError);
  assert.equal(err.code, "42601");
  assert.equal(err.position, "15");
  assert.match(err.message, /syntax error at or near "WHERE"/);
});

await check("ro credentials read and refuse a write", async () => {
  const ro = neon(roUrl);
  assert.deepEqual(await ro`SELECT count(*)::int AS n FROM driver_items`, [{ n: 2 }]);
  const err = await rejects(ro`INSERT INTO driver_items VALUES (9, 'nine')`);
  assert.ok(err instanceof NeonDbError);
  assert.ok(["42501", "25006"].includes(err.code), err.code);
});

await check("a wrong password is refused", async () => {
  const url = new URL(rwUrl);
  url.password = "not-the-password";
  const err = await rejects(neon(url.toString())`SELECT 1`);
  assert.ok(err instanceof NeonDbError);
  assert.equal(err.code, "28P01");
  assert.match(err.message, /password authentication failed/);
});

await direct.end();
if (!process.exitCode) console.log(`ok ${checks}`);
