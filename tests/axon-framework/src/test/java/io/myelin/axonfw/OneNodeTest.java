package io.myelin.axonfw;

import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;

/** A test class whose tests share one Myelin node, started before them and stopped after. */
abstract class OneNodeTest {
    static MyelinNode node;

    @BeforeAll
    static void startNode() throws Exception {
        node = MyelinNode.start();
    }

    @AfterAll
    static void stopNode() throws Exception {
        node.close();
    }
}
