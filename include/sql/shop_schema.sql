-- The seed's application table. Applied by the lab as the `app` role (idempotent).
CREATE TABLE IF NOT EXISTS critical_orders (
    order_id    bigint PRIMARY KEY,
    customer_id integer     NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    status      text        NOT NULL CHECK (status IN ('pending', 'completed', 'cancelled', 'shipped')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS critical_orders_status_idx ON critical_orders (status);
