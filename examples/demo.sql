-- The demo that `cargo run` serves: sensors writing readings, modelled on the
-- tutorial's sensors example. streams.toml inserts a reading every second and drops
-- readings older than a minute, standing in for Materialize's temporal filter.
-- (The development engine evaluates SQL with SQLite; see the README's limits.)

CREATE TABLE sensors (id int, name text, location text);
INSERT INTO sensors VALUES
  (1, 'boiler', 'basement'),
  (2, 'attic', 'roof'),
  (3, 'server room', 'floor 2');

CREATE TABLE readings (sensor_id int, temperature double precision, pressure double precision, ts bigint);

-- One row per sensor over the last minute of readings.
CREATE MATERIALIZED VIEW sensors_view_1s AS
  SELECT sensor_id,
         count(*) AS readings,
         round(avg(temperature), 2) AS avg_temperature,
         round(avg(pressure), 1) AS avg_pressure,
         max(ts) AS last_ts
  FROM readings
  GROUP BY sensor_id;

-- The newest reading of each sensor, streamed with a key.
CREATE VIEW latest_reading AS
  SELECT s.id AS sensor_id, s.name, s.location, r.temperature, r.pressure, r.ts
  FROM sensors s
  JOIN readings r ON r.sensor_id = s.id
  WHERE r.ts = (SELECT max(r2.ts) FROM readings r2 WHERE r2.sensor_id = s.id);
