'use strict';
// Reference Node service for the pgsession interoperability test: an Express 5
// app with express-session + connect-pg-simple, configured the way the Rust
// side expects (cookie `connect.sid`, same secrets, same table).
//
// Environment:
//   DATABASE_URL      postgres connection string (required)
//   PGSESSION_SECRET  comma-separated secrets, first one signs (required)
//   PGSESSION_TABLE   table name, default session_store
//   PGSESSION_SCHEMA  schema name, default public
//   PORT              port on 127.0.0.1, default 0 (any free port)
// Prints `listening <port>` on stdout once it accepts connections.
//
// Contract:
//   POST /login {"user":"alice"} -> 200 {"user":"alice"} (new session id)
//   GET  /me                     -> 200 {"user":..., "views":N} | 401 {"error":"not logged in"}
//   POST /counter                -> 200 {"views":N} after incrementing and saving
//   GET  /counter                -> 200 {"views":N} (0 without a session), unchanged
//   POST /logout                 -> 204, session destroyed, cookie cleared

// Dates (and the pg session's timestamps) in UTC, as the Rust side writes them.
process.env.TZ = 'UTC';

const express = require('express');
const session = require('express-session');
const pg = require('pg');
const PgSession = require('connect-pg-simple')(session);

const COOKIE_NAME = 'connect.sid';
const COOKIE_OPTIONS = { secure: false, httpOnly: true, sameSite: 'lax', maxAge: 86400000 };

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} must be set`);
    process.exit(2);
  }
  return value;
}

const databaseUrl = required('DATABASE_URL');
// Split exactly as pgsession's Secrets::parse_list does: no trimming.
const secrets = required('PGSESSION_SECRET').split(',');
const tableName = process.env.PGSESSION_TABLE || 'session_store';
const schemaName = process.env.PGSESSION_SCHEMA || 'public';
const port = Number.parseInt(process.env.PORT || '0', 10);

const pool = new pg.Pool({
  connectionString: databaseUrl,
  options: '-c TimeZone=UTC',
});

const store = new PgSession({
  pool,
  conString: databaseUrl,
  tableName,
  schemaName,
  createTableIfMissing: true,
});

const app = express();
app.disable('x-powered-by');
app.use(express.json());
app.use(
  session({
    name: COOKIE_NAME,
    secret: secrets,
    store,
    resave: false,
    saveUninitialized: false,
    cookie: COOKIE_OPTIONS,
  }),
);

// Promise wrappers around express-session's callback API.
const call = (sess, method) =>
  new Promise((resolve, reject) => sess[method]((err) => (err ? reject(err) : resolve())));

app.post('/login', async (req, res) => {
  const user = req.body && req.body.user;
  if (typeof user !== 'string' || user.length === 0) {
    res.status(400).json({ error: 'user required' });
    return;
  }
  await call(req.session, 'regenerate');
  req.session.user = user;
  await call(req.session, 'save');
  res.status(200).json({ user });
});

app.get('/me', (req, res) => {
  if (!req.session.user) {
    res.status(401).json({ error: 'not logged in' });
    return;
  }
  res.status(200).json({ user: req.session.user, views: req.session.views || 0 });
});

app.post('/counter', async (req, res) => {
  req.session.views = (req.session.views || 0) + 1;
  await call(req.session, 'save');
  res.status(200).json({ views: req.session.views });
});

app.get('/counter', (req, res) => {
  res.status(200).json({ views: req.session.views || 0 });
});

app.post('/logout', async (req, res) => {
  await call(req.session, 'destroy');
  res.clearCookie(COOKIE_NAME, { path: '/', httpOnly: true, sameSite: 'lax', secure: false });
  res.status(204).end();
});

// JSON errors (bad JSON bodies, store failures) instead of Express's HTML page.
app.use((err, req, res, next) => {
  if (res.headersSent) {
    next(err);
    return;
  }
  const status = Number.isInteger(err.status) && err.status >= 400 && err.status < 600 ? err.status : 500;
  if (status >= 500) console.error(err);
  res.status(status).json({ error: status >= 500 ? 'internal error' : err.message });
});

const server = app.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
server.on('error', (err) => {
  console.error(err);
  process.exit(1);
});

function shutdown() {
  server.close(() => {
    // The store owns no pool here (we pass ours), so close it, then end the pool.
    store
      .close()
      .then(() => pool.end())
      .finally(() => process.exit(0));
  });
  // Idle keep-alive connections must not hold the process open.
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
